"""What every model family shares: image preprocessing, the :class:`ModelFamily` description and the
directories it saves and loads.

A :class:`ModelFamily` describes one family (ERNIE-ViL, Chinese-CLIP, ...): its model and tokenizer
classes, its ``tiny`` architecture, loading from a pretrained name or a local directory, saving so
the directory reloads on its own, its tokenization and its image preprocessing. Its kind and extra
inputs are stated once, in its line of :data:`vlretrieval.models.registry.BUILTIN_FAMILIES`; the
model class implements the interface of that kind (:mod:`vlretrieval.models.modeling_utils`). The
pipeline looks families up in the registry and only ever branches on ``family.kind``.

This module imports neither paddle nor paddlenlp at import time, so the image transforms stay cheap
to import (DataLoader workers unpickle them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import numpy as np

from ..errors import ConfigError, DownloadError
from ..io import atomic_directory, write_json
from .registry import FamilySpec, family_spec, get_family

if TYPE_CHECKING:  # pragma: no cover
    import paddle
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's pixel statistics: a pretrained CLIP tower expects inputs normalised with these.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Written into every model directory this package saves, so later stages know the family without
#: being told (and without guessing from file names).
MODEL_INFO_FILE = "vlretrieval_model.json"


# --------------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 ``[3, size, size]`` array, picklable so DataLoader workers can use it.

    Training (``train=True``) follows the ERNIE-ViL 2.0 recipe: RandomResizedCrop with area scale
    ``crop_scale`` and bicubic resampling, then an optional horizontal flip. Evaluation resizes the whole
    image to ``size x size`` (bicubic). Both end with ImageNet mean/std normalisation.

    ``hflip`` exists because a horizontal flip turns "left" into "right": it is the reference recipe
    and harmless for captions without such words, but it corrupts the labels of datasets whose
    captions describe positions (the offline demo), which therefore turn it off.
    """

    image_size: int
    train: bool = False
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # A RandAugment (vlretrieval.models.randaugment), applied after the flip in training.
    randaugment: Any = None

    def __post_init__(self):
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")

    def _crop_box(self, width: int, height: int, rng) -> tuple[int, int, int, int]:
        area = width * height
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = rng.randint(0, width - w)
                top = rng.randint(0, height - h)
                return left, top, left + w, top + h
        # No sample fitted (extreme aspect ratio): fall back to the largest central crop in range.
        ratio = width / height
        if ratio < self.crop_ratio[0]:
            w, h = width, int(round(width / self.crop_ratio[0]))
        elif ratio > self.crop_ratio[1]:
            w, h = int(round(height * self.crop_ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: "Image.Image", rng: random.Random | None = None) -> np.ndarray:
        from PIL import Image

        # The module-level generator is reseeded per DataLoader worker by paddle, so workers differ.
        rng = rng if rng is not None else random  # the module's functions share the Random API
        image = image.convert("RGB")
        size = (self.image_size, self.image_size)
        if self.train:
            box = self._crop_box(image.width, image.height, rng)
            image = image.resize(size, Image.BICUBIC, box=box)
            if self.hflip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if self.randaugment is not None:
                image = self.randaugment(image, rng)
        else:
            image = image.resize(size, Image.BICUBIC)
        return normalised_chw(np.asarray(image), self.mean, self.std)


@functools.lru_cache(maxsize=8)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """``(3, 256)`` float32: ``(value / 255 - mean) / std`` per channel for every 8-bit value, computed
    with the same float32 operations as normalising each pixel, so every entry is bit-identical."""
    values = np.arange(256, dtype=np.float32)[:, None] / 255.0
    return np.ascontiguousarray(((values - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).T)


def normalised_chw(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """8-bit ``[H, W, 3]`` pixels -> float32 ``[3, H, W]``, each channel scaled to [0, 1] and then
    standardised. A table lookup per channel: 2x (64 px) to 4x (224 px) faster than the arithmetic."""
    table = _normalisation_table(tuple(mean), tuple(std))
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[:, :, channel], out=out[channel])
    return out


# --------------------------------------------------------------------------------------------------
# Family description
# --------------------------------------------------------------------------------------------------


def is_local_source(source: str | os.PathLike) -> bool:
    """True when ``source`` names a local directory rather than a pretrained model name.

    Pretrained names contain a slash too (``PaddlePaddle/ernie_vil-2.0-base-zh``), so an explicit
    path form (absolute, ``./``, ``../``, ``~``) counts as local even when it does not exist; that way a
    typo in a directory fails with "not found" instead of a download attempt.
    """
    text = os.fspath(source)
    if os.path.isdir(text):
        return True
    return text.startswith(("/", "./", "../", "~")) or text in (".", "..")


def read_model_info(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The :data:`MODEL_INFO_FILE` of a model directory written by :meth:`ModelFamily.save`."""
    path = Path(model_dir) / MODEL_INFO_FILE
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not a model directory saved by vlretrieval (no {MODEL_INFO_FILE})") from None


@dataclass
class ModelFamily:
    """Description of one model family.

    A family subclass declares its classes; the default hooks build, load and save with them, so a
    family overrides only :meth:`tiny_config`, :meth:`published_config` and :meth:`model_info` and
    what really differs.

    Class attributes:
        model_class: the paddle model; the interface it implements must be the registered kind.
        tokenizer_class: the paddlenlp tokenizer.
        image_processor_class: the paddlenlp image processor saved with the model (None: none).
        image_mean / image_std: pixel normalisation of the transforms and the saved processor.
        known_pretrained_names: names paddlenlp resolves, listed when a download fails.

    Attributes:
        name: registry key (``"ernie_vil"``), also the model name used in configs.
        default_pretrained: the pretrained name used when a config says only ``pretrained``.
        supports_recompute: whether activation recomputation can be switched on for training.
        train_max_len / eval_max_len: default text lengths (tokens, with specials) for training and
            feature extraction.
        tiny: the default ``tiny`` architecture; ``build_tiny(**overrides)`` replaces entries.
    """

    model_class: ClassVar[type]
    tokenizer_class: ClassVar[type]
    image_processor_class: ClassVar[type | None] = None
    image_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    image_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    known_pretrained_names: ClassVar[tuple[str, ...]] = ()

    name: str
    description: str = ""
    default_pretrained: str | None = None
    supports_recompute: bool = False
    train_max_len: int = 32
    eval_max_len: int = 52
    tiny: dict[str, Any] = field(default_factory=dict)

    # -- what the registry states ---------------------------------------------------------------------

    @property
    def spec(self) -> FamilySpec:
        return family_spec(self.name)

    @property
    def kind(self) -> str:
        """``"dual_encoder"`` or ``"cross_encoder"``, as registered."""
        return self.spec.kind

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Serialized data besides the split's LMDB that training and evaluation read (``"regions"``)."""
        return self.spec.extra_inputs

    def implemented_kind(self) -> str:
        """The kind whose interface :attr:`model_class` implements."""
        from .modeling_utils import implemented_kind

        return implemented_kind(self.model_class)

    # -- construction -------------------------------------------------------------------------------

    def tiny_config(self, tokenizer: Any, **overrides: Any) -> Any:
        """The model configuration of the ``tiny`` architecture (with ``overrides``) for ``tokenizer``."""
        raise NotImplementedError

    def published_config(self, tokenizer: Any) -> Any:
        """The model configuration of the family's published architecture (the checkpoint its
        registry entry names), embedding tables at the published vocabulary size; refused when
        ``tokenizer`` has more tokens than those tables hold."""
        raise NotImplementedError

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
        """A randomly initialised ``tiny`` model and its tokenizer over the WordPiece ``vocab_file``.

        The same vocabulary, ``seed`` and ``overrides`` give bit-identical weights. ``vocab_file`` must
        still exist when the tokenizer is saved (see :mod:`vlretrieval.models.vocab` to build one).
        """
        return self._build_random(vocab_file, seed, lambda tokenizer: self.tiny_config(tokenizer, **overrides))

    def build_published(self, vocab_file: str | os.PathLike, *, seed: int = 0) -> tuple[Any, Any]:
        """A randomly initialised model of the published architecture (:meth:`published_config`) and
        its tokenizer over the WordPiece ``vocab_file``, as :meth:`build_tiny` builds the tiny one.

        No pretrained vocabulary is downloaded: the tokenizer reads ``vocab_file`` (built from
        captions), whose ids all fall inside the published embedding tables."""
        return self._build_random(vocab_file, seed, self.published_config)

    def _build_random(self, vocab_file: str | os.PathLike, seed: int, make_config: Callable[[Any], Any]) -> tuple[Any, Any]:
        tokenizer = self.tokenizer_class(vocab_file=os.fspath(vocab_file), do_lower_case=True)
        config = make_config(tokenizer)
        model = seeded_build(seed, lambda: self.model_class(config))
        model.eval()
        return model, tokenizer

    def load_model(self, source: str | os.PathLike) -> Any:
        """Load weights from a pretrained name or a local directory (see :func:`is_local_source`)."""
        model = load_pretrained(self.model_class, source, known_names=self.known_pretrained_names)
        model.eval()
        return model

    def load_tokenizer(self, source: str | os.PathLike) -> Any:
        return load_pretrained(self.tokenizer_class, source, known_names=self.known_pretrained_names)

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        """Write a self-contained model directory (weights, config, tokenizer, processor, model info).

        Writes into ``out_dir`` directly; use :meth:`save_atomic` when a half-written directory must
        never be visible under the final name.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out_dir))
        processor = self.image_processor(model)
        if processor is not None:
            processor.save_pretrained(str(out_dir))
        self.write_model_info(out_dir, {**self.model_info(model, tokenizer), **(extra_info or {})})
        return out_dir

    def save_atomic(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
        """:meth:`save` into a temporary sibling directory that is renamed to ``out_dir`` on success."""
        with atomic_directory(out_dir) as tmp:
            self.save(model, tokenizer, tmp, **kwargs)
        return Path(out_dir)

    def model_info(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        """What later stages read from the saved directory's :data:`MODEL_INFO_FILE` about ``model``.

        This default serves the dual encoders, whose paddlenlp configs hold a ``text_config``; a family
        adds its own keys to it or, for another kind of model, replaces it.
        """
        max_text_len = int(model.config.text_config.max_position_embeddings)
        return {
            "image_size": self.image_size(model),
            "embedding_dim": model.embedding_dim,
            "vocab_size": int(model.config.text_config.vocab_size),
            "train_max_len": self.train_max_len,
            "eval_max_len": min(self.eval_max_len, max_text_len),
            "max_text_len": max_text_len,
        }

    def write_model_info(self, out_dir: str | os.PathLike, info: dict[str, Any]) -> None:
        write_json(Path(out_dir) / MODEL_INFO_FILE, {"family": self.name, "kind": self.kind, **info})

    def image_processor(self, model: Any) -> Any:
        """A paddlenlp image processor of :attr:`image_processor_class` that preprocesses square images
        like the evaluation transform, so ``from_pretrained(model_dir)`` of the processor class works;
        None for a family without one. Non-square images differ: the processor resizes the short side
        and centre-crops, while the evaluation transform squashes the whole image to a square."""
        if self.image_processor_class is None:
            return None
        size = self.image_size(model)
        return self.image_processor_class(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(self.image_mean),
            image_std=list(self.image_std),
        )

    # -- training data ------------------------------------------------------------------------------

    def training_dataset(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *, max_len: int,
                         hparams: dict[str, Any], regions: str | os.PathLike | None = None) -> Any:
        """The dataset of training items; by default (dual encoders) one augmented pair per item."""
        from .datasets import FamilyTokenizer, PairDataset

        return PairDataset(
            train_data,
            self.training_transform(model, hparams),
            FamilyTokenizer(self.name, tokenizer),
            max_len=max_len,
        )

    def training_transform(self, model: Any, hparams: Mapping[str, Any]) -> ImageTransform:
        """The family's training transform with the run's augmentation: ``hflip``, ``crop_scale``
        (null keeps the family's) and ``randaugment``."""
        from .randaugment import randaugment_from

        transform = self.image_transform(model, train=True, hflip=hparams["hflip"])
        changes: dict[str, Any] = {"randaugment": randaugment_from(hparams.get("randaugment"))}
        if hparams.get("crop_scale") is not None:
            changes["crop_scale"] = tuple(float(x) for x in hparams["crop_scale"])
        return dataclasses.replace(transform, **changes)

    def training_collator(self, tokenizer: Any, model: Any, *, max_len: int) -> Any:
        """Turns a list of :meth:`training_dataset` items into the keyword inputs of ``model.forward``
        (texts of at most ``max_len`` tokens)."""
        from .datasets import PairCollator

        return PairCollator(tokenizer.pad_token_id)

    def pretrain(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *,
                 settings: Mapping[str, Any], regions: str | os.PathLike | None = None) -> dict[str, Any]:
        """Pretrain ``model`` in place on ``train_data`` with the family's pretraining objective (a
        model entry's ``pretrain``); returns what was done, for the model's info file."""
        raise ConfigError(f"{self.name} has no pretraining objective: remove 'pretrain' from its model entry")

    def pair_scorer(self, model_dir: str | os.PathLike, split_dir: str | os.PathLike, *,
                    regions: str | os.PathLike | None = None, batch_size: int = 256,
                    max_len: int | None = None) -> Any:
        """Cross encoders: a :class:`vlretrieval.retrieval.rerank.PairScorer` of the split's pairs."""
        raise ConfigError(f"{self.name} is a {self.kind}: it ranks by features, not by scoring pairs")

    # -- inputs -------------------------------------------------------------------------------------

    def image_size(self, model: Any) -> int:
        """Side length in pixels of the square images the model's vision tower expects."""
        return int(model.config.vision_config.image_size)

    def with_image_size(self, model: Any, image_size: int) -> Any:
        """``model`` reading square images of ``image_size`` pixels (a model entry's ``image_size``,
        e.g. fine-tuning at a higher resolution than pretraining). Families whose vision tower cannot
        change resolution refuse."""
        raise ConfigError(
            f"{self.name} cannot change the image resolution of its model: remove 'image_size' from its model entry"
        )

    def image_transform(self, model_or_size: Any, *, train: bool, hflip: bool = True) -> ImageTransform:
        """Preprocessing for training (augmented) or evaluation (deterministic) images."""
        size = model_or_size if isinstance(model_or_size, int) else self.image_size(model_or_size)
        return ImageTransform(image_size=size, train=train, hflip=hflip, mean=self.image_mean, std=self.image_std)

    def tokenize(
        self, tokenizer: Any, texts: Sequence[str], *, max_len: int, pad_to_max: bool = False
    ) -> dict[str, np.ndarray]:
        """Token ids and attention mask, truncated to ``max_len`` tokens (specials included).

        Returns ``int64`` arrays ``input_ids`` and ``attention_mask`` of shape ``[n, L]`` where ``L`` is
        the longest encoded text (or ``max_len`` with ``pad_to_max``).
        """
        if max_len < 2:
            raise ValueError(f"max_len must leave room for the two special tokens, got {max_len}")
        encoded = tokenizer(
            [self.normalise_text(text) for text in texts],
            max_length=max_len,
            truncation=True,
            padding="max_length" if pad_to_max else "longest",
            return_attention_mask=True,
            return_token_type_ids=False,
        )
        return {
            "input_ids": np.asarray(encoded["input_ids"], dtype=np.int64),
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int64),
        }

    def normalise_text(self, text: str) -> str:
        """The text as the tokenizer must see it; a family overrides this when its pretraining did too."""
        return str(text)


# --------------------------------------------------------------------------------------------------
# Saved model directories
# --------------------------------------------------------------------------------------------------


class LoadedModel(NamedTuple):
    """A saved model directory, loaded: its family, the model (eval mode), tokenizer and model info."""

    family: ModelFamily
    model: Any
    tokenizer: Any
    info: dict[str, Any]


def model_dir_family(model_dir: str | os.PathLike) -> ModelFamily:
    """The family that saved ``model_dir`` (from its :data:`MODEL_INFO_FILE`), without loading weights."""
    return get_family(read_model_info(model_dir)["family"])


def load_model_dir(model_dir: str | os.PathLike, *, kind: str | None = None, purpose: str = "this step") -> LoadedModel:
    """Load a directory written by :meth:`ModelFamily.save` through the family it names.

    With ``kind`` a model of the other kind is refused, naming ``purpose`` (what needs the kind).
    """
    info = read_model_info(model_dir)
    family = get_family(info["family"])
    if kind is not None and family.kind != kind:
        raise ConfigError(f"{model_dir}: {purpose} needs a {kind}, {family.name} is a {family.kind}")
    model = family.load_model(model_dir)
    model.eval()
    return LoadedModel(family, model, family.load_tokenizer(model_dir), info)


def checked_context_length(requested: int | None, default: int, limit: int | None, where: str | os.PathLike) -> int:
    """``requested`` (or ``default``) tokens, refused when beyond the model's position table ``limit``."""
    max_len = int(requested or default)
    if limit is not None and max_len > int(limit):
        raise ConfigError(f"{where}: context length {max_len} exceeds the model's limit of {limit} tokens")
    return max_len


def eval_context_length(model_dir: str | os.PathLike, family: ModelFamily, requested: int | None = None) -> int:
    """Text length (tokens, specials included) for encoding texts with the model in ``model_dir``.

    ``requested`` defaults to the saved ``eval_max_len`` (the family's default clamped to the
    model's position table); a request beyond the position table is an error, not a silent cut.
    """
    info = read_model_info(model_dir)
    return checked_context_length(
        requested, int(info.get("eval_max_len") or family.eval_max_len), info.get("max_text_len"), model_dir
    )


def seeded_build(seed: int | None, build: Callable[[], Any]) -> Any:
    """``build()`` with paddle seeded by ``seed``; the caller's random stream is given back unchanged."""
    import paddle

    if seed is None:
        return build()
    saved_state = paddle.get_rng_state()
    paddle.seed(seed)
    try:
        return build()
    finally:
        paddle.set_rng_state(saved_state)


def check_model_source(source: str | os.PathLike) -> str:
    """``source`` as given to ``from_pretrained``; a local one must be a saved model directory."""
    source = os.fspath(source)
    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{path}: model directory not found")
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a saved model directory (no config.json)")
        return str(path)
    return source


def load_pretrained(cls: Any, source: str | os.PathLike, what: str = "", known_names: Sequence[str] = ()) -> Any:
    """``cls.from_pretrained(source)``; a name that cannot be fetched is a :class:`DownloadError` that
    says to pass a local directory instead (offline machines see this for every name)."""
    checked = check_model_source(source)
    try:
        return cls.from_pretrained(checked)
    except (OSError, ValueError, RuntimeError) as exc:
        if is_local_source(checked):
            raise
        known = f" (names paddlenlp knows: {', '.join(known_names)})" if known_names and checked not in known_names else ""
        raise DownloadError(
            f"cannot fetch pretrained {what or cls.__name__} {checked!r}{known}: no network, or an unknown name; "
            f"download it where the hub is reachable and pass the local directory instead: {exc}"
        ) from exc


def tiny_architecture(family_name: str, defaults: dict[str, Any], overrides: dict[str, Any], *,
                      what: str = "tiny") -> dict[str, Any]:
    """``defaults`` (the ``what`` architecture) with ``overrides`` applied, checked: known keys only,
    whole patches, whole heads."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown {family_name} {what} architecture keys {sorted(unknown)}; known: {sorted(defaults)}")
    arch = {**defaults, **overrides}
    if arch["image_size"] % arch["patch_size"]:
        raise ConfigError(f"image_size {arch['image_size']} is not a multiple of patch_size {arch['patch_size']}")
    for prefix in ("vision", "text"):
        if arch[f"{prefix}_hidden_size"] % arch[f"{prefix}_heads"]:
            raise ConfigError(f"{prefix}_hidden_size must be divisible by {prefix}_heads")
    return arch


def checked_published_vocab(family_name: str, tokenizer_vocab_size: int, published_vocab_size: int) -> int:
    """``published_vocab_size``, the rows of the published embedding table, once the tokenizer's ids
    are known to fit in it (a vocabulary built from captions is far smaller than a published one)."""
    if int(tokenizer_vocab_size) > int(published_vocab_size):
        raise ConfigError(
            f"{family_name}: the tokenizer has {tokenizer_vocab_size} tokens, more than the {published_vocab_size} "
            "rows of the published embedding table; build the vocabulary with a higher min_count"
        )
    return int(published_vocab_size)


def tower_configs(
    arch: Mapping[str, Any], vocab_size: int, *, text_extra: Mapping[str, Any] | None = None,
    vision_extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The BERT-style text config and ViT vision config of a checked ``tiny`` architecture
    (:func:`tiny_architecture`), each with a family's extra entries."""
    text_config = {
        "vocab_size": int(vocab_size),
        "hidden_size": arch["text_hidden_size"],
        "num_hidden_layers": arch["text_layers"],
        "num_attention_heads": arch["text_heads"],
        "intermediate_size": arch["text_intermediate_size"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "type_vocab_size": arch["type_vocab_size"],
        "hidden_dropout_prob": arch["hidden_dropout_prob"],
        "attention_probs_dropout_prob": arch["attention_probs_dropout_prob"],
        **dict(text_extra or {}),
        "pad_token_id": 0,
    }
    vision_config = {
        "image_size": arch["image_size"],
        "patch_size": arch["patch_size"],
        "hidden_size": arch["vision_hidden_size"],
        "num_hidden_layers": arch["vision_layers"],
        "num_attention_heads": arch["vision_heads"],
        "intermediate_size": arch["vision_intermediate_size"],
        **dict(vision_extra or {}),
    }
    return text_config, vision_config
