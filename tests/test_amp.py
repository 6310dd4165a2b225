"""Mixed precision and data-loading workers: the ``train.amp`` and ``eval.precision`` settings, what
reaches paddlenlp's Trainer, the immediate refusal of what this paddle cannot run, bfloat16 extraction
through oneDNN, and the rank's image-decoding workers."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import paddle
import pytest

from vlretrieval.config import MODELS_SCHEMA, load_datasets, load_models, validate_against_schema, validate_pair_overrides
from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.download import safe_extract
from vlretrieval.data.lmdb_store import serialize_split
from vlretrieval.errors import ConfigError
from vlretrieval.models.export import InferenceEncoder, export_model, feature_agreement
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.retrieval.extract import extract_split, feature_paths
from vlretrieval.retrieval.features import load_features
from vlretrieval.retrieval.metrics import score_directions
from vlretrieval.retrieval.predictions import read_gold_t2i
from vlretrieval.training.finetune import finetune
from vlretrieval.training.hparams import (
    DEFAULT_HPARAMS,
    amp_training_arguments,
    resolve_dataloader_workers,
    resolve_hparams,
    training_arguments,
)
from vlretrieval.training.launcher import launch_finetune
from vlretrieval.training.trainer import _trainer_class

from .conftest import REPO

paddle.set_device("cpu")

FLOAT16_O2 = {"amp": {"dtype": "float16", "level": "O2", "init_loss_scaling": 1024}}


# -- configuration --------------------------------------------------------------------------------


def test_amp_defaults_to_float32_and_is_validated_like_other_train_keys():
    assert DEFAULT_HPARAMS["amp"] is None and DEFAULT_HPARAMS["dataloader_num_workers"] is None
    assert resolve_hparams({"amp": {"dtype": "bfloat16"}})["amp"] == {
        "dtype": "bfloat16", "level": "O1", "init_loss_scaling": 32768}
    for bad, problem in (
        ({"dtype": "fp16"}, r"amp\.dtype: 'fp16' is not one of \['float16', 'bfloat16'\]"),
        ({"dtype": "float16", "level": "O3"}, r"amp\.level: 'O3' is not one of"),
        ({"level": "O2"}, r"amp: 'dtype' is a required property"),
        ({"dtype": "float16", "loss_scale": 8}, r"amp\.loss_scale: unknown key; known here: dtype, init_loss_scaling, level"),
        ({"dtype": "float16", "init_loss_scaling": 0}, r"amp\.init_loss_scaling"),
        ("bfloat16", r"amp: 'bfloat16' is not of type 'object', 'null'"),
    ):
        with pytest.raises(ConfigError, match=problem):
            resolve_hparams({"amp": bad})


def test_a_bad_amp_block_in_a_pair_override_fails_at_config_time():
    datasets, models = load_datasets(REPO / "config" / "datasets.yaml"), load_models(REPO / "config" / "models.yaml")
    config = {"pair_overrides": {"demo_cn": {"ernie_vil": {"train": {"amp": {"dtype": "float8"}}}}}}
    with pytest.raises(ConfigError, match=r"pair_overrides\.demo_cn\.ernie_vil .*train\.amp\.dtype: 'float8'"):
        validate_pair_overrides(config, models, datasets)
    config["pair_overrides"]["demo_cn"]["ernie_vil"]["train"]["amp"] = {"dtype": "float16", "level": "O2"}
    entry = validate_pair_overrides(config, models, datasets)[("demo_cn", "ernie_vil")]
    assert entry["train"]["amp"] == {"dtype": "float16", "level": "O2", "init_loss_scaling": 32768}
    assert entry["eval"]["precision"] == "float32"
    # Half-precision extraction runs through the export only.
    with pytest.raises(ConfigError, match=r"precision: 'bfloat16' is not allowed: Half precision runs through the export"):
        validate_against_schema({"engine": "dynamic", "precision": "bfloat16"}, MODELS_SCHEMA, "--eval", keys=("eval",))
    with pytest.raises(ConfigError, match=r"precision: 'half' is not one of"):
        validate_against_schema({"precision": "half"}, MODELS_SCHEMA, "--eval", keys=("eval",))


# -- what reaches the Trainer -------------------------------------------------------------------------


def test_float16_on_gpus_reaches_the_trainer_with_loss_scaling(tmp_path):
    """The GPU float16 path: TrainingArguments fields, then the Trainer's autocast, GradScaler and
    the float32 master weights of O2 (built here on the CPU, where paddle leaves the scaler off)."""
    assert amp_training_arguments(None) == {"fp16": False, "bf16": False}
    args = training_arguments(resolve_hparams(FLOAT16_O2), tmp_path, device="gpu", recompute=False,
                              dataloader_num_workers=7)
    assert (args.device, args.fp16, args.bf16, args.fp16_opt_level, args.scale_loss) == ("gpu", True, False, "O2", 1024.0)
    assert args.dataloader_num_workers == 7

    args = training_arguments(resolve_hparams(FLOAT16_O2), tmp_path, device="cpu", recompute=False,
                              dataloader_num_workers=0)
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 4), paddle.nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer_class()(model=model, args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.enable_autocast_context_manager and trainer.do_grad_scaling and trainer.amp_dtype == "float16"
    assert isinstance(trainer.scaler, paddle.amp.GradScaler)
    assert not isinstance(trainer.autocast_smart_context_manager(), contextlib.nullcontext)
    # O2 keeps half-precision weights, so the optimizer updates float32 masters of them.
    assert trainer.optimizer._multi_precision is True

    bf16 = training_arguments(resolve_hparams({"amp": {"dtype": "bfloat16"}}), tmp_path, device="gpu",
                              recompute=False, dataloader_num_workers=1)
    assert (bf16.fp16, bf16.bf16, bf16.fp16_opt_level) == (False, True, "O1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer_class()(model=paddle.nn.Linear(4, 4), args=training_arguments(
            resolve_hparams({"amp": {"dtype": "bfloat16"}}), tmp_path, device="cpu", recompute=False,
            dataloader_num_workers=0))
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
    # bfloat16 has float32's exponent range: no loss scaling, and O1 keeps float32 weights.
    assert trainer.enable_autocast_context_manager and not trainer.do_grad_scaling and trainer.amp_dtype == "bfloat16"
    assert not trainer.optimizer._multi_precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer_class()(model=paddle.nn.Linear(4, 4), args=training_arguments(
            resolve_hparams({}), tmp_path, device="cpu", recompute=False, dataloader_num_workers=0))
    assert isinstance(trainer.autocast_smart_context_manager(), contextlib.nullcontext) and not trainer.do_grad_scaling


# -- what this paddle runs ----------------------------------------------------------------------------


def test_this_paddle_trains_no_half_precision_on_the_cpu():
    """Why half-precision training is refused on CPU ranks: auto_cast switches itself off there (a
    warning, then float32), and paddle's CPU kernels of matmul, layer_norm, softmax and conv2d have
    no bfloat16 or float16. A paddle that gains them fails this test: revisit check_amp_device."""
    x = paddle.randn([2, 3, 32, 32])
    conv = paddle.nn.Conv2D(3, 4, 16, stride=16)
    for dtype in ("bfloat16", "float16"):
        with pytest.warns(UserWarning, match="amp_guard can only be enabled on CUDAPlace"):
            with paddle.amp.auto_cast(True, level="O1", dtype=dtype):
                out = paddle.matmul(conv(x).flatten(1), paddle.randn([16, 4]))
        assert out.dtype == paddle.float32
        half = paddle.randn([4, 4]).astype(dtype)
        for name, op in (
            ("matmul", lambda: paddle.matmul(half, half)),
            ("layer_norm", lambda: paddle.nn.functional.layer_norm(half, 4)),
            ("softmax", lambda: paddle.nn.functional.softmax(half)),
            ("conv2d", lambda: paddle.nn.functional.conv2d(x.astype(dtype), conv.weight.astype(dtype), stride=16)),
        ):
            with pytest.raises(RuntimeError, match=rf"kernel `{name}` is not registered.*{dtype}"):
                op()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_fine_tuning_fails_at_once_on_cpu(tmp_path, dtype):
    hparams = {"amp": {"dtype": dtype}}
    expected = rf"train\.amp\.dtype '{dtype}' cannot run on device 'cpu'"
    # In the rank: before the model directory is read (this one does not exist).
    with pytest.raises(ConfigError, match=expected):
        finetune(tmp_path / "no_model", tmp_path / "no_data", tmp_path / "work", tmp_path / "final",
                 hparams=hparams, device="cpu")
    # In the job: before any rank starts or the work directory is claimed.
    with pytest.raises(ConfigError, match=expected):
        launch_finetune(tmp_path / "no_model", tmp_path / "no_data", tmp_path / "work", tmp_path / "final",
                        n_ranks=2, use_gpu=False, hparams=hparams)
    assert not (tmp_path / "work").exists() and not (tmp_path / "final").exists()


def test_float16_export_fails_at_once_on_cpu(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.precision 'float16' cannot run on device 'cpu'"):
        export_model(tmp_path / "no_model", tmp_path / "export", precision="float16")
    assert not (tmp_path / "export").exists()


#: bfloat16 extraction against float32 on the demo's test split: each R@k of each direction within
#: two queries of 60 (3.4 points), the mean recall within one point.
RECALL_TOLERANCE_QUERIES = 2
MEAN_RECALL_TOLERANCE = 1.0


def _recall(features_dir, gold):
    images, texts = (load_features(path) for path in feature_paths(features_dir))
    similarity = texts.vectors @ images.vectors.T
    t2i = {int(t): [int(images.ids[j]) for j in np.argsort(-similarity[i], kind="stable")[:10]]
           for i, t in enumerate(texts.ids)}
    i2t = {int(m): [int(texts.ids[j]) for j in np.argsort(-similarity[:, i], kind="stable")[:10]]
           for i, m in enumerate(images.ids)}
    return images, texts, score_directions(t2i, i2t, gold)


def test_bfloat16_export_and_extraction_on_this_cpu(tmp_path):
    """bfloat16 runs here through oneDNN (paddle.inference) where the CPU has bfloat16
    instructions; the export is verified at that precision and recall stays with float32's."""
    from paddle.base import core

    write_demo_archive(DemoSpec(name="amp", sizes={"test": 60}, seed=5), tmp_path / "amp.zip")
    safe_extract(tmp_path / "amp.zip", tmp_path / "raw")
    split = tmp_path / "lmdb"
    serialize_split("raw_tsv", tmp_path / "raw", "test", split, entry={"format": "raw_tsv", "root": "amp"},
                    progress=False)
    prepare_initial_model("ernie_vil", "tiny", tmp_path / "model", vocab_texts=vocab_texts_from_split(split))
    if not core.supports_bfloat16():
        with pytest.raises(ConfigError, match="this CPU has no bfloat16 instructions"):
            export_model(tmp_path / "model", tmp_path / "bf16", threads=2, precision="bfloat16")
        return

    exports = {precision: export_model(tmp_path / "model", tmp_path / precision, threads=2, precision=precision)
               for precision in ("float32", "bfloat16")}
    assert exports["float32"]["precision"] == "float32" and exports["bfloat16"]["precision"] == "bfloat16"
    check = exports["bfloat16"]["verification"]
    # Half precision really ran (the outputs moved) and stayed within the bfloat16 tolerance.
    assert 1e-5 < check["image_max_abs_diff"] <= 5e-2 and check["image_min_cosine"] >= 0.995
    assert exports["float32"]["verification"]["image_max_abs_diff"] <= 1e-4
    assert InferenceEncoder(tmp_path / "bfloat16", device="cpu", threads=1).precision == "bfloat16"
    with pytest.raises(ConfigError, match=r"eval\.precision 'bfloat16' on device 'cpu' runs through oneDNN"):
        InferenceEncoder(tmp_path / "bfloat16", device="cpu", threads=1, onednn=False)

    gold = read_gold_t2i(split / "texts.jsonl")
    results = {}
    for precision in exports:
        extract_split(tmp_path / precision, split, tmp_path / f"features_{precision}", engine="inference", threads=2,
                      image_batch_size=64, text_batch_size=256, progress=False)
        results[precision] = _recall(tmp_path / f"features_{precision}", gold)
    for which in (0, 1):
        max_abs, min_cos = feature_agreement(results["float32"][which].vectors, results["bfloat16"][which].vectors)
        assert 0 < max_abs <= 5e-2 and min_cos >= 0.995
    full, half = results["float32"][2], results["bfloat16"][2]
    assert abs(full["mean_recall"] - half["mean_recall"]) <= MEAN_RECALL_TOLERANCE
    for direction, queries in (("text_to_image", 300), ("image_to_text", 60)):
        for k in ("r1", "r5", "r10"):
            assert abs(full[direction][k] - half[direction][k]) <= 100 * RECALL_TOLERANCE_QUERIES / queries + 1e-9


# -- data-loading workers -----------------------------------------------------------------------------


def test_gpu_ranks_get_image_decoding_workers_from_the_jobs_cpus(tmp_path):
    # The SLURM profile's 8 CPUs per GPU on a 4-GPU node: 7 workers beside each rank.
    assert resolve_dataloader_workers(None, device="gpu", cpus=32, local_ranks=4) == 7
    assert resolve_dataloader_workers(None, device="gpu", cpus=4, local_ranks=1) == 3
    # Fewer CPUs than ranks still decode off the training process.
    assert resolve_dataloader_workers(None, device="gpu", cpus=2, local_ranks=4) == 1
    assert resolve_dataloader_workers(None, device="cpu", cpus=32, local_ranks=2) == 0
    assert resolve_dataloader_workers(0, device="gpu", cpus=32, local_ranks=4) == 0
    assert resolve_dataloader_workers(3, device="cpu", cpus=32, local_ranks=2) == 3
    args = training_arguments(resolve_hparams({}), tmp_path, device="gpu", recompute=False,
                              dataloader_num_workers=resolve_dataloader_workers(
                                  DEFAULT_HPARAMS["dataloader_num_workers"], device="gpu", cpus=16, local_ranks=2))
    assert (args.device, args.dataloader_num_workers) == ("gpu", 7)
    with pytest.raises(ConfigError, match="dataloader_num_workers"):
        resolve_hparams({"dataloader_num_workers": -1})
