"""Assigning a CSV's images to splits by a salted hash ranking of their file names."""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

from ...errors import ConfigError

# Splits with an explicit size take their images first, in this order, from the hash ranking.
_SPLIT_ORDER = ("test", "valid", "train")


def _rank_key(salt: str, filename: str) -> bytes:
    return hashlib.sha256(f"{salt}\0{filename}".encode("utf-8")).digest()


def assign_splits(
    filenames: Iterable[str | None], splits: Iterable[str], sizes: Mapping[str, int], salt: str = ""
) -> list[str | None]:
    """The split of each file name (``None``: not used).

    Names are ranked by ``sha256(salt + NUL + name)``; the splits with a size take that many
    names from the front of the ranking, in the order test, valid, train; the one split of
    ``splits`` without a size, if any, takes the rest. ``None`` entries take no place and stay
    ``None``. The result depends only on the set of names and the salt, not on their order.

    :func:`~vlretrieval.data.url_corpus.build_url_corpus` passes every distinct file name of the
    CSV, whether or not its image could be fetched, so membership is a function of the CSV alone:
    an image that fails leaves a gap in its split rather than pulling in another image, and a
    name never changes split between runs.
    """
    splits = list(splits)
    for split in sizes:
        if split not in splits:
            raise ConfigError(f"url_corpus.split_sizes names {split!r}, which is not one of the splits {splits}")
    rest = [split for split in splits if split not in sizes]
    if len(rest) > 1:
        raise ConfigError(
            f"url_corpus.split_sizes must give a size to all but one of the splits {splits}; "
            f"{', '.join(rest)} have none, and only one split can take the remaining images"
        )
    names = list(filenames)
    order = sorted((i for i, name in enumerate(names) if name is not None), key=lambda i: _rank_key(salt, names[i]))
    result: list[str | None] = [None] * len(names)
    start = 0
    for split in (s for s in _SPLIT_ORDER if s in sizes):
        for i in order[start:start + sizes[split]]:
            result[i] = split
        start += sizes[split]
    if rest:
        for i in order[start:]:
            result[i] = rest[0]
    return result
