"""Reader for ``aic_icc``: the AI Challenger image caption release (annotations JSON + image directory)."""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

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


@dataclass(frozen=True)
class _AicLine:
    key: str  # "annotation 17, caption 3", or "annotation 17" for an annotation without captions
    text_id: int | None
    text: Any
    image_id: int | None
    problem: str | None


@dataclass(frozen=True)
class _AicImage:
    image_id: int
    name: str
    annotation: int  # the first annotation that names the file


def _annotation_fields(annotation: Any) -> tuple[str | None, str | None, list | None]:
    """``(problem, image file name, captions)`` of one annotation.

    ``captions`` is ``None`` only when the annotation has no usable caption list; then it adds
    no caption lines, because how many it should have added cannot be known.
    """
    if not isinstance(annotation, dict):
        return f"annotation is {_json_type(annotation)}, not an object with image_id and caption", None, None
    missing = [key for key in ("image_id", "caption") if key not in annotation]
    captions = annotation.get("caption")
    if "caption" in missing:
        return f"annotation lacks the key{'s' if len(missing) > 1 else ''} {', '.join(missing)}", None, None
    if not isinstance(captions, list):
        return f"caption is {_json_type(captions)}, not an array of captions", None, None
    if not captions:
        return "caption is an empty array", None, None
    if missing:
        return "annotation lacks the key image_id", None, captions
    name = annotation["image_id"]
    if not isinstance(name, str):
        return f"image_id is {_json_type(name)}, not a file name", None, captions
    if not _plain_file_name(name):
        return f"image_id {name[:80]!r} is not a plain file name in the image directory", None, captions
    return None, name, captions


class AicIccSplit(SourceSplit):
    """One split of the AI Challenger image caption release: annotations JSON + image directory.

    The annotations are flattened in file order into caption lines (annotation 0 captions 0..4,
    annotation 1 captions 0..4, ...) and only the first ``max_lines`` lines are kept, which is
    how ERNIE-ViL 2.0 defines its zero-shot split ("the first 10,000 lines of the validation
    set"). Text ids are the 0-based line index; image ids are 0-based in order of the first
    kept line naming the file. Records keep the source names for messages: images are located
    by their file path, texts by ``annotation N, caption M`` (0-based list positions) in the
    JSON. An annotation without a usable caption list adds no line and is reported as one bad
    text record. Images are read from disk one at a time, on each pass.
    """

    fmt = "aic_icc"

    def __init__(self, annotations_path: Path, image_dir: Path, split: str, max_lines: int | None):
        self.path = _require_file(annotations_path, self.fmt)
        if not image_dir.is_dir():
            raise DataError(str(image_dir), f"image directory not found (format {self.fmt} expects it)")
        self.image_dir = image_dir
        self.max_lines = max_lines
        self._snapshot = _FileSnapshot(self.path)
        self._scanned: tuple[list[_AicLine], list[_AicImage]] | None = None
        cut = "all caption lines" if max_lines is None else f"first {max_lines} caption lines"
        super().__init__(split, f"aic_icc {split} split in {annotations_path} + {image_dir} ({cut})")

    @property
    def images_file(self) -> str:
        return str(self.image_dir)

    def _load(self) -> list[Any]:
        data = self.path.read_bytes()
        try:
            # utf-8-sig: a BOM is the one harmless difference a re-saved copy of the file may have.
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(str(self.path), f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            annotations = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(str(self.path), f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
                from None
        except RecursionError:
            raise DataError(str(self.path), "not readable JSON (nested too deeply)") from None
        if not isinstance(annotations, list):
            raise DataError(str(self.path), f"expected a JSON array of annotations, found {_json_type(annotations)}")
        return annotations

    def _scan(self) -> tuple[list[_AicLine], list[_AicImage]]:
        self._snapshot.check()
        if self._scanned is not None:
            return self._scanned
        lines: list[_AicLine] = []
        images: dict[str, _AicImage] = {}
        next_text_id = 0

        def full() -> bool:
            return self.max_lines is not None and next_text_id >= self.max_lines

        for index, annotation in enumerate(self._load()):
            if full():
                break
            problem, name, captions = _annotation_fields(annotation)
            if captions is None:
                lines.append(_AicLine(f"annotation {index}", None, None, None, problem))
                continue
            for caption_index, caption in enumerate(captions):
                if full():
                    break
                image_id = None
                if name is not None:
                    if name not in images:
                        images[name] = _AicImage(len(images), name, index)
                    image_id = images[name].image_id
                line_problem = problem
                text = caption
                if line_problem is None:
                    if not isinstance(caption, str):
                        line_problem = f"caption is {_json_type(caption)}, not a string"
                    else:
                        text = clean_caption(caption)
                        if not text:
                            line_problem = "caption is empty"
                lines.append(_AicLine(f"annotation {index}, caption {caption_index}", next_text_id, text, image_id,
                                      line_problem))
                next_text_id += 1
        self._scanned = (lines, list(images.values()))
        return self._scanned

    def iter_images(self) -> Iterator[SourceImage]:
        _lines, images = self._scan()
        for image in images:
            path = self.image_dir / image.name
            payload: bytes = b""
            problem = None
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                problem = f"image file not found (named by annotation {image.annotation} of {self.path.name})"
            except OSError as exc:
                problem = f"cannot read the image file ({exc.strerror or exc})"
            else:
                if not data:
                    problem = "image file is empty"
                else:
                    # The validator takes every format's images as base64 (the text formats store
                    # them so); encoding here keeps a single validation path for one image's bytes.
                    payload = binascii.b2a_base64(data, newline=False)
            yield SourceImage(str(path), None, None, str(image.image_id), payload, problem)

    def iter_texts(self) -> Iterator[SourceText]:
        lines, _images = self._scan()
        file = str(self.path)
        for line in lines:
            obj = None
            if line.text_id is not None:
                obj = {"text_id": line.text_id, "text": line.text}
                if line.image_id is not None:
                    obj["image_ids"] = [line.image_id]
            yield SourceText(file, None, line.key, obj, line.problem)

    def input_bytes(self) -> int:
        _lines, images = self._scan()
        total = self.path.stat().st_size
        for image in images:
            try:
                # The output stores each file's bytes unchanged, so their sizes are the estimate.
                total += (self.image_dir / image.name).stat().st_size
            except OSError:
                pass  # reported as a bad image by iter_images
        return total



def _max_lines(entry: Mapping[str, Any]) -> int | None:
    value = entry.get("max_lines")
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise ConfigError(f"max_lines must be a positive integer or null, got {value!r}")
    return value
