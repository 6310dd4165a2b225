"""The ``url_corpus`` block of a dataset's registry entry, checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ...errors import ConfigError
from .. import raw


@dataclass(frozen=True)
class UrlCorpusSettings:
    """The ``url_corpus`` block of a registry entry (``config/schemas/datasets.schema.yaml``)."""

    csv: str
    split_sizes: Mapping[str, int]
    split_salt: str = ""
    min_image_side: int = 32
    drop_gif: bool = True
    max_image_mb: float = 32.0
    threads: int = 16
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 1.0

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "UrlCorpusSettings":
        block = entry.get("url_corpus")
        if not isinstance(block, Mapping):
            raise ConfigError("format url_csv needs a url_corpus mapping in the dataset entry")
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"url_corpus: unknown key(s) {', '.join(unknown)}")
        if not isinstance(block.get("csv"), str) or not block["csv"].strip():
            raise ConfigError("url_corpus.csv must name the CSV file inside the download directory")
        values = {key: block[key] for key in cls.__dataclass_fields__ if key in block and block[key] is not None}
        settings = cls(**{**values, "split_sizes": dict(block.get("split_sizes") or {})})
        settings.check()
        return settings

    def check(self) -> None:
        for split, size in self.split_sizes.items():
            if split not in raw.SPLITS:
                raise ConfigError(f"url_corpus.split_sizes: unknown split {split!r}; splits are {', '.join(raw.SPLITS)}")
            if type(size) is not int or size < 1:
                raise ConfigError(f"url_corpus.split_sizes.{split} must be a positive integer, got {size!r}")
        positive_ints = {"min_image_side": self.min_image_side, "threads": self.threads, "retries": self.retries}
        for key, value in positive_ints.items():
            if type(value) is not int or value < 1:
                raise ConfigError(f"url_corpus.{key} must be a positive integer, got {value!r}")
        for key in ("timeout", "max_image_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"url_corpus.{key} must be a positive number, got {value!r}")
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, (int, float)) or self.backoff < 0:
            raise ConfigError(f"url_corpus.backoff must be a non-negative number, got {self.backoff!r}")
        if not isinstance(self.drop_gif, bool):
            raise ConfigError(f"url_corpus.drop_gif must be true or false, got {self.drop_gif!r}")

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)
