"""Static inference models of a dual encoder, and running them through ``paddle.inference``.

An export directory holds one static program per tower, each taking a dynamic batch (and, for
texts, a dynamic length)::

    export.json        manifest: family, image size, context length, embedding dim, inputs, paddle version
    image/inference.json, image/inference.pdiparams     pixel_values [n, 3, S, S] float32 -> [n, d]
    text/inference.json,  text/inference.pdiparams      input_ids, attention_mask [n, L] int64 -> [n, d]
    assets/            the source model directory without its weights (tokenizer, configs, model info)

The manifest also records the ``precision`` the towers run at (``eval.precision``): float32, or
half precision where the device has it (bfloat16 through oneDNN on a CPU with bfloat16
instructions; float16 or bfloat16 on a GPU). The programs and weights stay float32 either way:
paddle.inference converts them when it builds the predictor, and the export is verified at that
precision against the float32 model.

Outputs are the L2-normalised embeddings of ``encode_images`` / ``encode_texts``. Only the
:class:`~vlretrieval.models.modeling_utils.DualEncoder` interface is traced, so every dual-encoder family
exports the same way. Paddle 3 with PIR (the default) writes the program as ``.json``; a legacy
``.pdmodel`` program written by an older paddle is read as well.

This module imports paddle; import it only where paddle is needed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import paddle
from paddle.static import InputSpec

from ..config import MODELS_SCHEMA, schema_default
from ..errors import ConfigError
from ..io import atomic_directory, write_json
from .base import MODEL_INFO_FILE, eval_context_length, load_model_dir
from .registry import DUAL_ENCODER, get_family

log = logging.getLogger(__name__)

EXPORT_FORMAT = "vlretrieval.export"
EXPORT_VERSION = 1
MANIFEST_FILE = "export.json"
ASSETS_DIR = "assets"
PROGRAM_PREFIX = "inference"
PARAMS_SUFFIX = ".pdiparams"
# PIR programs (paddle >= 3.0 default) first, then the legacy ProgramDesc.
PROGRAM_SUFFIXES = (".json", ".pdmodel")
IMAGE_INPUTS = ("pixel_values",)
TEXT_INPUTS = ("input_ids", "attention_mask")
ENCODER_INPUTS = {"image": IMAGE_INPUTS, "text": TEXT_INPUTS}

# Weight files are already inside the static models' .pdiparams; everything else of the source
# directory (tokenizer, configs, model info) is small and needed to prepare inputs.
WEIGHT_SUFFIXES = (".pdparams", ".safetensors", ".bin", ".pdopt", ".pt", ".pth", ".ckpt", ".pdiparams")

# Agreement the exported towers must reach with the dynamic float32 model before an export is
# accepted: (largest absolute difference, smallest cosine) per precision. bfloat16 keeps 8 bits of
# mantissa (relative rounding 2**-9 per op); the tiny demo models measure 0.003 and 0.99997.
VERIFY_ATOL = 1e-4
VERIFY_MIN_COSINE = 0.9999
VERIFY_TOLERANCE = {
    "float32": (VERIFY_ATOL, VERIFY_MIN_COSINE),
    "bfloat16": (5e-2, 0.995),
    "float16": (1e-2, 0.999),
}
PRECISIONS = tuple(VERIFY_TOLERANCE)
# Texts of different lengths, so the check also runs the text program at two shapes.
VERIFY_TEXTS = ("一只猫的照片", "草地上一个红色的圆形和左边一个蓝色的正方形，背景是白色的")


class _ImageTower(paddle.nn.Layer):
    def __init__(self, encoder: Any):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values):
        return self.encoder.encode_images(pixel_values)


class _TextTower(paddle.nn.Layer):
    def __init__(self, encoder: Any):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder.encode_texts(input_ids, attention_mask=attention_mask)


def _program_files(directory: Path) -> tuple[Path, Path]:
    """(program, parameters) of one saved tower, or ConfigError naming what is missing."""
    params = directory / f"{PROGRAM_PREFIX}{PARAMS_SUFFIX}"
    for suffix in PROGRAM_SUFFIXES:
        program = directory / f"{PROGRAM_PREFIX}{suffix}"
        if program.is_file():
            break
    else:
        names = " or ".join(f"{PROGRAM_PREFIX}{s}" for s in PROGRAM_SUFFIXES)
        raise ConfigError(f"{directory}: no inference program ({names})")
    if not params.is_file():
        raise ConfigError(f"{params}: missing parameters of the inference program")
    return program, params


def _input_specs(image_size: int) -> dict[str, list[tuple[str, list[int], str]]]:
    """(name, shape, dtype) of each tower's inputs; -1 marks a dynamic dimension."""
    return {
        "image": [(IMAGE_INPUTS[0], [-1, 3, int(image_size), int(image_size)], "float32")],
        "text": [(name, [-1, -1], "int64") for name in TEXT_INPUTS],
    }


def save_encoder_programs(model: Any, out_dir: str | os.PathLike, *, image_size: int) -> dict[str, dict[str, Any]]:
    """Trace ``model``'s two towers into static programs under ``out_dir/image`` and ``out_dir/text``.

    ``model`` is any :class:`~vlretrieval.models.modeling_utils.DualEncoder` layer; it is put in eval mode
    (dropout off) before tracing. Batch size and text length stay dynamic. Returns, per encoder,
    the program and parameter file names and the inputs, as recorded in the manifest. Writes into
    ``out_dir`` directly; :func:`export_model` stages it atomically.
    """
    out_dir = Path(out_dir)
    model.eval()
    towers = {"image": _ImageTower(model), "text": _TextTower(model)}
    written: dict[str, dict[str, Any]] = {}
    for name, inputs in _input_specs(image_size).items():
        tower = towers[name]
        tower.eval()
        specs = [InputSpec([None if d < 0 else d for d in shape], dtype, input_name)
                 for input_name, shape, dtype in inputs]
        # full_graph: one AST-converted program; the default (SOT) may fall back to Python and
        # leave graph breaks, which jit.save cannot serialize.
        static = paddle.jit.to_static(tower, input_spec=specs, full_graph=True)
        paddle.jit.save(static, str(out_dir / name / PROGRAM_PREFIX))
        program, params = _program_files(out_dir / name)
        written[name] = {
            "dir": name,
            "program": program.name,
            "params": params.name,
            "program_format": "pir_json" if program.suffix == ".json" else "program_desc",
            "inputs": [{"name": n, "shape": shape, "dtype": dtype} for n, shape, dtype in inputs],
            "output": {"shape": [-1, int(model.embedding_dim)], "dtype": "float32", "l2_normalized": True},
        }
    return written


def _copy_assets(model_dir: Path, assets_dir: Path) -> list[str]:
    assets_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(path, assets_dir / path.name)
            copied.append(path.name)
    return copied


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_len: int | None = None,
    verify: bool = True,
    threads: int | None = None,
    precision: str = schema_default(MODELS_SCHEMA, "eval", "precision"),
) -> dict[str, Any]:
    """Export the dual encoder saved in ``model_dir`` to ``out_dir``, atomically; returns the manifest.

    ``max_len`` (default: the model's evaluation context length) is recorded as the length texts
    are truncated to when features are extracted from the export. ``precision`` is recorded as the
    precision the towers run at; one this machine cannot run (:func:`check_precision_device`)
    fails before the model is loaded. With ``verify`` the written programs are run through
    ``paddle.inference`` at that precision and must agree with the dynamic float32 model within
    ``VERIFY_TOLERANCE[precision]``, or nothing is written.
    """
    check_precision_device(precision, "gpu" if gpu_available() else "cpu")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: model directory not found")
    if (model_dir / MANIFEST_FILE).is_file():
        raise ConfigError(f"{model_dir}: already an exported model; export a saved model directory instead")
    try:
        family, model, tokenizer, info = load_model_dir(model_dir, kind=DUAL_ENCODER, purpose="export")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir}: cannot load the model to export: {exc}") from exc
    max_len = eval_context_length(model_dir, family, max_len)
    image_size = int(family.image_size(model))

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        encoders = save_encoder_programs(model, tmp, image_size=image_size)
        assets = _copy_assets(model_dir, tmp / ASSETS_DIR)
        manifest = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "family": family.name,
            "kind": DUAL_ENCODER,
            "image_size": image_size,
            "max_len": max_len,
            "max_text_len": None if info.get("max_text_len") is None else int(info["max_text_len"]),
            "embedding_dim": int(model.embedding_dim),
            "precision": precision,
            "paddle_version": paddle.__version__,
            "source_model_dir": str(model_dir.resolve()),
            "encoders": encoders,
            "assets": {"dir": ASSETS_DIR, "files": assets},
        }
        write_json(tmp / MANIFEST_FILE, manifest)
        if verify:
            manifest["verification"] = _verify(tmp, model, family, tokenizer, image_size, max_len, threads)
            write_json(tmp / MANIFEST_FILE, manifest)
    log.info("exported %s (%s, dim %d) to %s", model_dir, family.name, manifest["embedding_dim"], out_dir)
    return manifest


def _verify(export_dir: Path, model: Any, family: Any, tokenizer: Any, image_size: int, max_len: int,
            threads: int | None) -> dict[str, float]:
    """Run the exported towers and the dynamic model on the same inputs; raise unless they agree."""
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, image_size, image_size)).astype(np.float32)
    encoded = family.tokenize(tokenizer, list(VERIFY_TEXTS), max_len=max_len)
    engine = InferenceEncoder(export_dir, threads=threads)
    atol, min_cosine = VERIFY_TOLERANCE[engine.precision]
    with paddle.no_grad():
        expected_images = model.encode_images(paddle.to_tensor(pixels)).astype("float32").numpy()
        expected_texts = model.encode_texts(
            paddle.to_tensor(encoded["input_ids"]), attention_mask=paddle.to_tensor(encoded["attention_mask"])
        ).astype("float32").numpy()
    report = {}
    for what, got, expected in (
        ("image", engine.encode_images(pixels), expected_images),
        ("text", engine.encode_texts(encoded["input_ids"], encoded["attention_mask"]), expected_texts),
    ):
        max_abs, min_cos = feature_agreement(got, expected)
        if not (max_abs <= atol and min_cos >= min_cosine):
            raise ConfigError(
                f"{export_dir}: the exported {what} encoder ({engine.precision}) disagrees with the dynamic model "
                f"(max abs difference {max_abs:.3g}, min cosine {min_cos:.6f}); the export was not written"
            )
        report[f"{what}_max_abs_diff"] = max_abs
        report[f"{what}_min_cosine"] = min_cos
    return report


def feature_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(largest absolute difference, smallest row cosine) of two feature matrices of one shape."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {a.shape} and {b.shape}")
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.abs(a - b).max()), float(cosine.min())


# --------------------------------------------------------------------------------------------------
# Reading an export
# --------------------------------------------------------------------------------------------------


def read_export_manifest(export_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export directory, checked for format, version and files."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_FILE
    if not export_dir.is_dir():
        raise ConfigError(f"{export_dir}: exported model directory not found")
    if not path.is_file():
        if (export_dir / MODEL_INFO_FILE).is_file():
            raise ConfigError(
                f"{export_dir}: a saved model directory, not an exported one; export it first "
                f"(workflow_scripts/export.py) or extract with the dynamic engine"
            )
        raise ConfigError(f"{export_dir}: not an exported model (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc.msg}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise ConfigError(f"{path}: not a {EXPORT_FORMAT} manifest")
    if manifest.get("version") != EXPORT_VERSION:
        raise ConfigError(f"{path}: export version {manifest.get('version')!r} is not supported "
                          f"(this code reads version {EXPORT_VERSION})")
    missing = [key for key in ("family", "image_size", "max_len", "embedding_dim", "encoders") if key not in manifest]
    if missing:
        raise ConfigError(f"{path}: missing {missing}")
    for name, inputs in ENCODER_INPUTS.items():
        entry = manifest["encoders"].get(name)
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: no {name} encoder")
        recorded = tuple(spec["name"] for spec in entry.get("inputs", []))
        if recorded != inputs:
            raise ConfigError(f"{path}: {name} encoder inputs {list(recorded)}, expected {list(inputs)}")
        for key in ("program", "params"):
            if not (export_dir / entry["dir"] / entry[key]).is_file():
                raise ConfigError(f"{export_dir / entry['dir'] / entry[key]}: missing from the exported model")
    return manifest


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_available() -> bool:
    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def _onednn_available() -> bool:
    from paddle.base import core

    for name in ("is_compiled_with_onednn", "is_compiled_with_mkldnn"):
        check = getattr(core, name, None)
        if check is not None:
            return bool(check())
    return False


def check_precision_device(precision: str, device: str, *, onednn: bool = True) -> None:
    """Raise ConfigError, naming ``eval.precision``, unless ``device`` ("cpu" or "gpu") runs ``precision``.

    On the CPU only oneDNN has half-precision kernels (paddle's own CPU kernels for matmul,
    layer_norm, softmax and conv2d are float32 only): bfloat16 needs oneDNN and a CPU with
    bfloat16 instructions (AVX512-BF16 or AMX), and float16 does not run. On a GPU float16 and
    bfloat16 run where the device supports them (bfloat16: compute capability 8.0).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"eval.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return
    if device == "gpu":
        supported = paddle.amp.is_float16_supported() if precision == "float16" else paddle.amp.is_bfloat16_supported()
        if not supported:
            hint = "bfloat16 needs compute capability 8.0; use float16 or" if precision == "bfloat16" else "use"
            raise ConfigError(f"eval.precision {precision!r} is not supported by this GPU "
                              f"({paddle.device.cuda.get_device_name()}); {hint} float32")
        return
    from paddle.base import core

    if precision == "float16":
        raise ConfigError("eval.precision 'float16' cannot run on device 'cpu': paddle has no float16 CPU "
                          "kernels; use bfloat16 (a CPU with bfloat16 instructions) or float32")
    if not (onednn and _onednn_available()):
        raise ConfigError("eval.precision 'bfloat16' on device 'cpu' runs through oneDNN, which this paddle "
                          "build or run does not use; use float32")
    if not core.supports_bfloat16():
        raise ConfigError("eval.precision 'bfloat16' cannot run on device 'cpu': this CPU has no bfloat16 "
                          "instructions (AVX512-BF16 or AMX); use float32")


def create_predictor(program: Path, params: Path, *, device: str, threads: int, onednn: bool = True,
                     precision: str, gpu_id: int = 0, gpu_memory_mb: int = 256):
    """A ``paddle.inference`` predictor of one program on ``device`` ("cpu" or "gpu") computing in
    ``precision`` (checked by :func:`check_precision_device`); inputs and outputs stay float32."""
    from paddle import inference

    check_precision_device(precision, device, onednn=onednn)
    config = inference.Config(str(program), str(params))
    if device == "gpu":
        gpu_precision = {"float32": inference.PrecisionType.Float32, "float16": inference.PrecisionType.Half,
                         "bfloat16": inference.PrecisionType.Bfloat16}[precision]
        config.enable_use_gpu(gpu_memory_mb, gpu_id, gpu_precision)
    else:
        config.disable_gpu()
        # Math-library threads are what a CPU job's thread budget buys; oneDNN kernels use them too.
        config.set_cpu_math_library_num_threads(int(threads))
        if onednn and _onednn_available():
            # Paddle 3 renamed enable_mkldnn to enable_onednn; older releases have only the former.
            enable = getattr(config, "enable_onednn", None) or config.enable_mkldnn
            enable()
            if precision == "bfloat16":
                config.enable_onednn_bfloat16()
    # No enable_memory_optim: with a PIR program paddle 3.3 fails to create the predictor
    # ("Not find predictor_id 0 and pass_name memory_optimize_pass").
    config.switch_ir_optim(True)
    config.disable_glog_info()
    return inference.create_predictor(config)


class InferenceEncoder:
    """The two exported towers of an export directory behind ``encode_images`` / ``encode_texts``.

    Takes and returns numpy arrays: ``[n, 3, S, S]`` float32 pixels or ``[n, L]`` int64 ids and mask,
    giving ``[n, d]`` float32 embeddings. ``device`` is ``"auto"`` (a GPU when paddle has CUDA and
    sees a device, else the CPU), ``"gpu"`` or ``"cpu"``; on the CPU oneDNN runs with ``threads``
    math-library threads (default: the CPUs this process may use). ``precision`` defaults to the
    one the manifest records (float32 for exports that record none).
    """

    def __init__(self, export_dir: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                 onednn: bool = True, precision: str | None = None):
        self.export_dir = Path(export_dir)
        self.manifest = read_export_manifest(self.export_dir)
        if device == "auto":
            device = "gpu" if gpu_available() else "cpu"
        if device not in ("cpu", "gpu"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not gpu_available():
            raise ConfigError("device 'gpu' requested, but paddle has no CUDA or sees no GPU")
        self.device = device
        self.precision = precision or self.manifest.get("precision", "float32")
        check_precision_device(self.precision, device, onednn=onednn)
        self.threads = int(threads or default_threads())
        self._predictors = {}
        for name in ENCODER_INPUTS:
            entry = self.manifest["encoders"][name]
            program, params = _program_files(self.export_dir / entry["dir"])
            predictor = create_predictor(program, params, device=device, threads=self.threads, onednn=onednn,
                                         precision=self.precision)
            names = tuple(predictor.get_input_names())
            if set(names) != set(ENCODER_INPUTS[name]):
                raise ConfigError(f"{program}: program inputs {list(names)}, expected {list(ENCODER_INPUTS[name])}")
            self._predictors[name] = predictor

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def _run(self, name: str, arrays: Sequence[np.ndarray]) -> np.ndarray:
        predictor = self._predictors[name]
        for input_name, array in zip(ENCODER_INPUTS[name], arrays):
            handle = predictor.get_input_handle(input_name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(np.ascontiguousarray(array))
        predictor.run()
        return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        size = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must be [n, 3, {size}, {size}], got {list(pixel_values.shape)}")
        return self._run("image", [pixel_values])

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids {list(input_ids.shape)} and attention_mask {list(attention_mask.shape)} "
                             "must be matching [n, L] arrays")
        limit = self.manifest.get("max_text_len")
        if limit is not None and input_ids.shape[1] > int(limit):
            raise ValueError(f"texts of {input_ids.shape[1]} tokens exceed the model's limit of {limit}")
        return self._run("text", [input_ids, attention_mask])


@dataclass(frozen=True)
class ExportedModel:
    """What feature extraction needs from an export: the family, its tokenizer and the encoders."""

    family: Any
    tokenizer: Any
    encoder: InferenceEncoder


def load_exported_model(export_dir: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                        onednn: bool = True) -> ExportedModel:
    """Family, tokenizer (from the export's assets) and :class:`InferenceEncoder` of an export."""
    encoder = InferenceEncoder(export_dir, device=device, threads=threads, onednn=onednn)
    family = get_family(encoder.manifest["family"])
    if family.kind != DUAL_ENCODER:
        raise ConfigError(f"{export_dir}: exported family {family.name} is a {family.kind}, not a dual encoder")
    assets = Path(export_dir) / encoder.manifest.get("assets", {}).get("dir", ASSETS_DIR)
    if not assets.is_dir():
        raise ConfigError(f"{assets}: missing from the exported model (the tokenizer lives there)")
    return ExportedModel(family=family, tokenizer=family.load_tokenizer(assets), encoder=encoder)
