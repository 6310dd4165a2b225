"""One interface for every model family, in two kinds.

* :class:`DualEncoder` (kind ``"dual_encoder"``) embeds images and texts separately into one
  L2-normalised space and trains with a contrastive loss; retrieval is a dot product.
* :class:`CrossEncoder` (kind ``"cross_encoder"``) scores an (image, text) pair jointly and trains
  with an image-text matching loss; retrieval re-ranks candidates from a dual encoder.

A :class:`ModelFamily` describes one family (ERNIE-ViL, Chinese-CLIP, ...): how to build its ``tiny``
architecture, load it from a pretrained name or a local directory, save it so the directory reloads
on its own, its tokenizer and its image preprocessing. The pipeline looks families up in
:mod:`vlretrieval.models.registry` and only ever branches on ``family.kind``.

This module imports neither paddle nor paddlenlp at import time, so the registry and the image
transforms stay cheap to import (DataLoader workers, workflow scripts).
"""

from __future__ import annotations

import dataclasses
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

if TYPE_CHECKING:  # pragma: no cover
    import paddle
    from PIL import Image

DUAL_ENCODER = "dual_encoder"
CROSS_ENCODER = "cross_encoder"
KINDS = (DUAL_ENCODER, CROSS_ENCODER)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# CLIP's bound on the logit scale: beyond 100 the softmax saturates and training becomes unstable.
MAX_LOGIT_SCALE = 100.0

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
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(array.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------------
# Model interfaces
# --------------------------------------------------------------------------------------------------


class DualEncoderOutput(NamedTuple):
    """What a dual encoder's ``forward`` returns during training: local, un-gathered features.

    ``logit_scale`` is part of the output (not read from the model afterwards) so that the
    temperature is reachable from the outputs; ``paddle.DataParallel`` with
    ``find_unused_parameters`` would otherwise treat it as unused and never all-reduce its gradient.
    """

    image_features: "paddle.Tensor"  # [n, d], L2-normalised
    text_features: "paddle.Tensor"  # [n, d], L2-normalised
    logit_scale: "paddle.Tensor"  # [1] or scalar, exp of the learnable log-temperature


class DualEncoder:
    """Mixin for paddle layers that embed images and texts separately (kind ``"dual_encoder"``).

    Implementations provide :meth:`encode_images`, :meth:`encode_texts`, :meth:`logit_scale` and
    :meth:`clamp_logit_scale_`, and make ``forward(pixel_values=..., input_ids=..., attention_mask=...)``
    return :class:`DualEncoderOutput` *without* gathering across ranks: the loss gathers, once and
    explicitly (:func:`vlretrieval.training.losses.clip_contrastive_loss`).

    A plain mixin rather than an ``abc.ABC``: paddlenlp models have their own metaclass, and ABCMeta
    cannot be combined with it.
    """

    kind: ClassVar[str] = DUAL_ENCODER

    def encode_images(self, pixel_values: "paddle.Tensor") -> "paddle.Tensor":
        """``[n, 3, H, W]`` normalised pixels -> ``[n, d]`` L2-normalised image embeddings."""
        raise NotImplementedError

    def encode_texts(
        self, input_ids: "paddle.Tensor", attention_mask: "paddle.Tensor | None" = None, **kwargs: Any
    ) -> "paddle.Tensor":
        """``[n, L]`` token ids (+ mask) -> ``[n, d]`` L2-normalised text embeddings."""
        raise NotImplementedError

    def logit_scale(self) -> "paddle.Tensor":
        """The multiplier of the cosine similarities, ``exp(log-temperature)``."""
        raise NotImplementedError

    def clamp_logit_scale_(self, max_scale: float = MAX_LOGIT_SCALE) -> None:
        """Clamp the learnable temperature in place so that ``1 <= logit_scale() <= max_scale``."""
        raise NotImplementedError

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (as in ``named_parameters``) that weight decay must not touch."""
        return set()

    @property
    def embedding_dim(self) -> int:
        raise NotImplementedError

    def contrastive_loss(self, output: DualEncoderOutput, *, gather_with_grad: bool = False, group=None):
        """CLIP loss of this model's ``forward`` output, with cross-batch negatives across ranks."""
        from ..training.losses import clip_contrastive_loss

        return clip_contrastive_loss(
            output.image_features,
            output.text_features,
            output.logit_scale,
            gather_with_grad=gather_with_grad,
            group=group,
        )

    def training_loss(self, output: DualEncoderOutput, *, gather_with_grad: bool = False, group=None):
        """The loss the trainer minimises: the contrastive loss."""
        return self.contrastive_loss(output, gather_with_grad=gather_with_grad, group=group)


class CrossEncoder:
    """Mixin for models that score (image, text) pairs jointly (kind ``"cross_encoder"``).

    Families of this kind (VinVL/Oscar+, BridgeTower) implement :meth:`score_pairs` for re-ranking and
    :meth:`itm_loss` for training on positives and sampled hard negatives.
    """

    kind: ClassVar[str] = CROSS_ENCODER

    def score_pairs(self, **inputs: Any) -> "paddle.Tensor":
        """Matching score ``[n]`` of ``n`` aligned (image, text) pairs; higher means a better match."""
        raise NotImplementedError

    def itm_loss(self, labels: "paddle.Tensor", **inputs: Any) -> "paddle.Tensor":
        """Image-text matching loss of ``n`` pairs with binary ``labels`` (1 = matching pair)."""
        raise NotImplementedError

    def training_loss(self, output: Any, **kwargs: Any) -> "paddle.Tensor":
        """The loss the trainer minimises, from what ``forward`` returned for a training batch."""
        raise NotImplementedError


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
    """Description of one model family; subclasses implement the loading and saving hooks.

    Attributes:
        name: registry key (``"ernie_vil"``), also the model name used in configs.
        kind: :data:`DUAL_ENCODER` or :data:`CROSS_ENCODER`.
        default_pretrained: the pretrained name used when a config says only ``pretrained``.
        supports_recompute: whether activation recomputation can be switched on for training.
        train_max_len / eval_max_len: default text lengths (tokens, with specials) for training and
            feature extraction.
        tiny: the default ``tiny`` architecture; ``build_tiny(**overrides)`` replaces entries.
    """

    name: str
    kind: str
    description: str = ""
    default_pretrained: str | None = None
    supports_recompute: bool = False
    train_max_len: int = 32
    eval_max_len: int = 52
    tiny: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    # -- construction -------------------------------------------------------------------------------

    def build_tiny(self, vocab_file: str | os.PathLike, *, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
        """A randomly initialised ``tiny`` model and its tokenizer over the WordPiece ``vocab_file``.

        The same vocabulary, ``seed`` and ``overrides`` give bit-identical weights. ``vocab_file`` must
        still exist when the tokenizer is saved (see :mod:`vlretrieval.models.vocab` to build one).
        """
        raise NotImplementedError

    def load_model(self, source: str | os.PathLike) -> Any:
        """Load weights from a pretrained name or a local directory (see :func:`is_local_source`)."""
        raise NotImplementedError

    def load_tokenizer(self, source: str | os.PathLike) -> Any:
        raise NotImplementedError

    def save(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, extra_info: dict | None = None) -> Path:
        """Write a self-contained model directory (weights, config, tokenizer, processor, model info).

        Writes into ``out_dir`` directly; use :meth:`save_atomic` when a half-written directory must
        never be visible under the final name.
        """
        raise NotImplementedError

    def save_atomic(self, model: Any, tokenizer: Any, out_dir: str | os.PathLike, **kwargs: Any) -> Path:
        """:meth:`save` into a temporary sibling directory that is renamed to ``out_dir`` on success."""
        with atomic_directory(out_dir) as tmp:
            self.save(model, tokenizer, tmp, **kwargs)
        return Path(out_dir)

    def write_model_info(self, out_dir: str | os.PathLike, info: dict[str, Any]) -> None:
        write_json(Path(out_dir) / MODEL_INFO_FILE, {"family": self.name, "kind": self.kind, **info})

    # -- training data ------------------------------------------------------------------------------

    #: Serialized data besides the split's LMDB that training and evaluation read: ``"regions"``
    #: (detector region features and tags, :mod:`vlretrieval.data.regions`) or nothing.
    extra_inputs: ClassVar[tuple[str, ...]] = ()

    def training_dataset(self, model: Any, tokenizer: Any, train_data: str | os.PathLike, *, max_len: int,
                         hparams: dict[str, Any], regions: str | os.PathLike | None = None) -> Any:
        """The dataset of training items; by default (dual encoders) one augmented pair per item."""
        from ..training.data import FamilyTokenizer, PairDataset

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
        from ..training.data import PairCollator

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
        raise NotImplementedError

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
        return ImageTransform(image_size=size, train=train, hflip=hflip)

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


def tiny_architecture(family_name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` with ``overrides`` applied, checked: known keys only, whole patches, whole heads."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ConfigError(f"unknown {family_name} tiny architecture keys {sorted(unknown)}; known: {sorted(defaults)}")
    arch = {**defaults, **overrides}
    if arch["image_size"] % arch["patch_size"]:
        raise ConfigError(f"image_size {arch['image_size']} is not a multiple of patch_size {arch['patch_size']}")
    for prefix in ("vision", "text"):
        if arch[f"{prefix}_hidden_size"] % arch[f"{prefix}_heads"]:
            raise ConfigError(f"{prefix}_hidden_size must be divisible by {prefix}_heads")
    return arch
