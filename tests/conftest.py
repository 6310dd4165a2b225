"""Shared fixtures: running the real workflow in a scratch directory."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def snakemake_env() -> dict[str, str]:
    env = dict(os.environ)
    # Rules call `python`; it must be this interpreter so the package and its pins are the ones tested.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GLOG_v", "0")
    if os.environ.get("VLRETRIEVAL_SLURM") != "1":
        # Only the opt-in SLURM stage talks to a cluster. Elsewhere the SLURM executor plugin, which
        # snakemake imports at start, would still ask `scontrol show config`, and on a machine whose
        # cluster is configured but stopped (ci/slurm/stop.sh) that waits 9-10 s for the controller;
        # with no configuration to read it fails at once.
        env["SLURM_CONF"] = os.devnull
    return env


class Workflow:
    """The repository's Snakefile run in a scratch working directory with a test config."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.config_path = workdir / "test_config.yaml"

    def write_config(self, config: dict, datasets: dict | None = None, models: dict | None = None) -> None:
        config = dict(config)
        if datasets is not None:
            path = self.workdir / "datasets.yaml"
            path.write_text(yaml.safe_dump(datasets, allow_unicode=True), encoding="utf-8")
            config["datasets_file"] = str(path)
        if models is not None:
            path = self.workdir / "models.yaml"
            path.write_text(yaml.safe_dump(models, allow_unicode=True), encoding="utf-8")
            config["models_file"] = str(path)
        self.config_path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")

    def run(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        cmd = [
            str(BIN / "snakemake"),
            "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(self.workdir),
            "--cores", "2",
        ]
        cmd += list(args)
        # Last, because --configfile takes every following word as another config file.
        if self.config_path.exists():
            cmd += ["--configfile", str(self.config_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=snakemake_env(), timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        return proc


@pytest.fixture
def workflow(tmp_path: Path) -> Workflow:
    return Workflow(tmp_path)


def tiny_demo_entry(sizes: dict[str, int], name: str = "demo_tiny") -> dict:
    """A demo registry entry small enough for end-to-end tests."""
    return {
        "description": "small demo for tests",
        "language": "zh",
        "format": "raw_tsv",
        "root": name,
        "splits": list(sizes),
        "eval_split": "test" if "test" in sizes else list(sizes)[-1],
        "generator": {"seed": 3, "image_size": 64, "captions_per_image": 5, "sizes": sizes},
        "files": [{"url": f"resources/sources/{name}.zip", "sha256_file": f"resources/sources/{name}.zip.sha256"}],
    }


def make_image(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    """Encoded bytes of a seeded noise image, so every test image is distinct and reproducible."""
    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def serialized_region_split(root: Path, name: str, seed: int, images: int) -> list[str]:
    """An English demo ``train`` split of ``images`` images serialized under ``root`` (``lmdb/``, its
    region store ``regions/``, and ``vocab.txt`` from its captions); returns the captions."""
    import zipfile

    from vlretrieval.data import regions
    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.lmdb_store import SplitStore, serialize_split
    from vlretrieval.models.vocab import build_vocab_file

    spec = DemoSpec(name=name, seed=seed, sizes={"train": images}, caption_language="en", regions=True)
    write_demo_archive(spec, root / "demo.zip")
    zipfile.ZipFile(root / "demo.zip").extractall(root / "dl")
    entry = {"format": "raw_tsv", "root": name,
             "regions": {"features": "{split}_features.tsv", "predictions": "{split}_predictions.tsv"}}
    serialize_split("raw_tsv", root / "dl", "train", root / "lmdb", entry=entry, progress=False, workers=1)
    regions.serialize_split_regions(root / "dl", entry, "train", root / "lmdb", root / "regions")
    with SplitStore(root / "lmdb") as store:
        texts = [t.text for t in store.texts()]
    build_vocab_file(texts, root / "vocab.txt")
    return texts
