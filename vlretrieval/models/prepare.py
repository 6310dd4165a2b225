"""The starting model directory of a fine-tuning run: random weights (the tiny architecture or the
published one) with a vocabulary built from the training captions, pretrained weights or separately
pretrained towers, optionally resized and pretrained with the family's own objective."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError
from ..io import atomic_directory

#: ``init`` values that build random weights with a vocabulary from the training captions: the
#: family's ``tiny`` architecture, or its published one (``random``) with the published table sizes.
CAPTION_VOCABULARY_INITS = ("tiny", "random")


def vocab_texts_from_split(split_dir: str | os.PathLike) -> list[str]:
    """Every caption of a serialized split, in file order (input for a tiny model's vocabulary)."""
    from .datasets import release_store, shared_store

    texts = [record.text for record in shared_store(split_dir).texts()]
    release_store(split_dir)
    return texts


def prepare_initial_model(
    family_name: str,
    init: str | Mapping[str, str],
    out_dir: str | os.PathLike,
    *,
    vocab_texts: Iterable[str] | None = None,
    seed: int = 0,
    tiny_overrides: Mapping[str, Any] | None = None,
    vocab_min_count: int = 1,
    pretrain: Mapping[str, Any] | None = None,
    train_data: str | os.PathLike | None = None,
    regions: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> Path:
    """Write the starting model directory of a fine-tuning run, atomically.

    ``init`` is ``"tiny"`` (random weights from ``seed``, vocabulary built from ``vocab_texts``),
    ``"random"`` (the family's published architecture, random weights from ``seed``, vocabulary
    built from ``vocab_texts`` inside the published embedding tables), a pretrained name, a local model directory, or a mapping from tower to a pretrained name or
    directory (``{"vision": ..., "text": ...}``) for families assembled from separately pretrained
    towers (``family.load_towers``; new weights such as projections come from ``seed``). The result
    reloads offline with ``family.load_model(out_dir)`` / ``family.load_tokenizer(out_dir)``.

    With ``image_size`` the model is first set to read images of that size (``family.with_image_size``:
    BridgeTower resamples its position table, as its authors fine-tune at 384 px from 288 px weights);
    the info file records both sizes.

    With ``pretrain`` (a model entry's ``pretrain`` settings) the model is then pretrained on
    ``train_data`` (and its ``regions``) with the family's pretraining objective before it is saved
    (``family.pretrain``); the info file records the run.
    """
    from .registry import get_family
    from .vocab import build_vocab_file

    family = get_family(family_name)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        if init in CAPTION_VOCABULARY_INITS:
            if vocab_texts is None:
                raise ConfigError(f"init {init!r} for {family_name} needs vocab_texts to build its vocabulary")
            if init == "random" and tiny_overrides:
                raise ConfigError("tiny_overrides only apply to init 'tiny'; 'random' is the published architecture")
            # The vocabulary is written inside the staging directory, so the tokenizer's save
            # finds its source file there and the final rename carries it along.
            tokens = build_vocab_file(vocab_texts, tmp / "vocab.txt", min_count=vocab_min_count)
            if init == "tiny":
                model, tokenizer = family.build_tiny(tmp / "vocab.txt", seed=seed, **dict(tiny_overrides or {}))
                info = {"init": "tiny", "seed": int(seed), "tiny_overrides": dict(tiny_overrides or {})}
            else:
                model, tokenizer = family.build_published(tmp / "vocab.txt", seed=seed)
                info = {"init": "random", "seed": int(seed)}
            info["vocab_tokens"] = len(tokens)
        elif isinstance(init, Mapping):
            if tiny_overrides:
                raise ConfigError("tiny_overrides only apply to init 'tiny'")
            load_towers = getattr(family, "load_towers", None)
            if load_towers is None:
                raise ConfigError(
                    f"{family_name} cannot be assembled from separate towers {sorted(init)}; "
                    "give init one pretrained name or model directory"
                )
            towers = {str(key): os.fspath(value) for key, value in init.items()}
            model, tokenizer = load_towers(towers, seed=seed)
            info = {"init": towers, "seed": int(seed)}
        elif isinstance(init, (str, os.PathLike)):
            if tiny_overrides:
                raise ConfigError("tiny_overrides only apply to init 'tiny'")
            model = family.load_model(init)
            tokenizer = family.load_tokenizer(init)
            info = {"init": os.fspath(init)}
        else:
            raise ConfigError(
                f"init must be 'tiny', 'random', a pretrained name, a directory or a mapping of towers, got {init!r}"
            )
        if image_size is not None:
            before = family.image_size(model)
            model = family.with_image_size(model, image_size)
            info["image_resize"] = {"from": before, "to": family.image_size(model)}
        if pretrain is not None:
            if train_data is None:
                raise ConfigError(f"pretraining {family_name} needs the training split (train_data)")
            info["pretrain"] = family.pretrain(model, tokenizer, train_data, settings=pretrain, regions=regions)
        family.save(model, tokenizer, tmp, extra_info=info)
    return out_dir
