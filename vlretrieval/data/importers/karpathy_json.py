"""Reader for ``karpathy_json``: Karpathy's caption split JSON with the image files on disk."""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ...errors import ConfigError, DataError
from .base import (
    SourceImage,
    SourceSplit,
    SourceText,
    _FileSnapshot,
    _json_type,
    _plain_file_name,
    _require_file,
    clean_caption,
)

# The Karpathy splits as the retrieval papers use them: "restval" (the rest of COCO val2014) is
# training data, which gives COCO's 113,287 / 5,000 / 5,000 images.
KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train", "restval"), "valid": ("val",), "test": ("test",)}


@dataclass(frozen=True)
class _KarpathyImage:
    index: int  # position in the JSON's images list
    image_id: int | None
    path: Path | None
    texts: list[tuple[str, Any, str | None]]  # (key, texts-jsonl object or None, problem)
    problem: str | None


class KarpathyJsonSplit(SourceSplit):
    """One split of a Karpathy caption JSON (``{"images": [{"split", "filepath", "filename", "cocoid" |
    "imgid", "sentences": [{"raw", "sentid"}]}]}``) with the image files on disk.

    Image ids are ``cocoid`` when present (the COCO image id, which is how VinVL's features are
    keyed), else ``imgid``; text ids are ``sentid``. The split's images are those whose ``split``
    is one of ``KARPATHY_SPLITS[split]``, in file order. Records are located as ``images[N]`` and
    ``images[N].sentences[M]`` of the JSON.
    """

    fmt = "karpathy_json"

    def __init__(self, annotations_path: Path, image_root: Path, split: str, flat_image_dir: bool):
        self.path = _require_file(annotations_path, self.fmt)
        if split not in KARPATHY_SPLITS:
            raise ConfigError(f"format karpathy_json has no split {split!r}; known: {', '.join(KARPATHY_SPLITS)}")
        if not image_root.is_dir():
            raise DataError(str(image_root), f"image directory not found (format {self.fmt} expects it)")
        self.image_root = image_root
        self.flat_image_dir = flat_image_dir
        self._snapshot = _FileSnapshot(self.path)
        self._scanned: list[_KarpathyImage] | None = None
        super().__init__(split, f"karpathy_json {split} split ({'+'.join(KARPATHY_SPLITS[split])}) in "
                                f"{annotations_path} + {image_root}")

    @property
    def images_file(self) -> str:
        return str(self.image_root)

    def _scan(self) -> list[_KarpathyImage]:
        self._snapshot.check()
        if self._scanned is not None:
            return self._scanned
        try:
            data = json.loads(self.path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as exc:
            raise DataError(str(self.path), f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise DataError(str(self.path), f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
        images = data.get("images") if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise DataError(str(self.path), "expected a JSON object with an 'images' array (Karpathy's split format)")
        wanted = KARPATHY_SPLITS[self.split]
        scanned = []
        for index, item in enumerate(images):
            if not isinstance(item, dict):
                problem = f"images[{index}] is {_json_type(item)}, not an object"
                scanned.append(_KarpathyImage(index, None, None, [], problem))
                continue
            if item.get("split") not in wanted:
                continue
            problem = None
            image_id = item.get("cocoid", item.get("imgid"))
            if type(image_id) is not int:
                problem, image_id = f"has no integer cocoid or imgid (found {image_id!r})", None
            name, folder = item.get("filename"), item.get("filepath", "")
            path = None
            if not (isinstance(name, str) and _plain_file_name(name)):
                problem = problem or f"filename {name!r} is not a plain file name"
            elif not self.flat_image_dir and folder and not (isinstance(folder, str) and _plain_file_name(folder)):
                problem = problem or f"filepath {folder!r} is not a plain directory name"
            else:
                path = self.image_root / name if self.flat_image_dir or not folder else self.image_root / folder / name
            texts = []
            sentences = item.get("sentences")
            if not isinstance(sentences, list):
                texts.append((f"images[{index}]", None, "has no 'sentences' array"))
                sentences = []
            for position, sentence in enumerate(sentences):
                key = f"images[{index}].sentences[{position}]"
                if not isinstance(sentence, dict):
                    texts.append((key, None, f"sentence is {_json_type(sentence)}, not an object"))
                    continue
                sent_id, raw_text = sentence.get("sentid"), sentence.get("raw")
                obj: dict[str, Any] = {"text_id": sent_id, "text": raw_text}
                if image_id is not None:
                    obj["image_ids"] = [image_id]
                line_problem = None
                if isinstance(raw_text, str):
                    obj["text"] = clean_caption(raw_text)
                else:
                    line_problem = f"raw is {_json_type(raw_text)}, not a string"
                texts.append((key, obj, line_problem))
            scanned.append(_KarpathyImage(index, image_id, path, texts, problem))
        self._scanned = scanned
        return scanned

    def iter_images(self) -> Iterator[SourceImage]:
        for image in self._scan():
            if image.image_id is None and image.problem and image.path is None and not image.texts:
                continue  # not an image entry at all; reported once as a text record below
            payload: bytes = b""
            problem = image.problem
            if problem is None and image.path is not None:
                try:
                    data = image.path.read_bytes()
                except FileNotFoundError:
                    problem = f"image file not found (named by images[{image.index}] of {self.path.name})"
                except OSError as exc:
                    problem = f"cannot read the image file ({exc.strerror or exc})"
                else:
                    if not data:
                        problem = "image file is empty"
                    else:
                        payload = binascii.b2a_base64(data, newline=False)
            location = str(image.path) if image.path is not None else f"{self.path} images[{image.index}]"
            yield SourceImage(location, None, None, str(image.image_id), payload, problem)

    def iter_texts(self) -> Iterator[SourceText]:
        file = str(self.path)
        for image in self._scan():
            if not image.texts and image.problem:
                yield SourceText(file, None, f"images[{image.index}]", None, image.problem)
            for key, obj, problem in image.texts:
                yield SourceText(file, None, key, obj, problem)

    def input_bytes(self) -> int:
        total = self.path.stat().st_size
        for image in self._scan():
            if image.path is not None:
                try:
                    total += image.path.stat().st_size
                except OSError:
                    pass  # reported as a bad image by iter_images
        return total
