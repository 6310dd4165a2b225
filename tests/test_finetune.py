"""Fine-tuning on a real serialized demo split with two real CPU ranks, including kill and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import paddle
import pytest

from vlretrieval.data.demo import DemoSpec, write_demo_archive
from vlretrieval.data.lmdb_store import serialize_split
from vlretrieval.errors import ConfigError
from vlretrieval.models.base import ImageTransform, read_model_info
from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split
from vlretrieval.models.registry import get_family
from vlretrieval.training.checkpoints import (
    TRAIN_LOG,
    find_resumable_checkpoint,
    is_complete_checkpoint,
    read_train_log,
)
from vlretrieval.models.datasets import (
    FamilyTokenizer,
    PairCollator,
    PairDataset,
    image_loader,
    release_store,
    shared_store,
    text_loader,
)
from vlretrieval.training.finetune import finetune
from vlretrieval.training.hparams import resolve_hparams, training_arguments
from vlretrieval.training.launcher import FinetuneError, launch_command, launch_env, launch_finetune

paddle.set_device("cpu")

N_RANKS = 2
BASE_HPARAMS = {
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 2,
    "hflip": False,
    "seed": 7,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    spec = DemoSpec(name="demo_ft", seed=3, sizes={"train": 40})
    write_demo_archive(spec, root / "demo_ft.zip")
    with zipfile.ZipFile(root / "demo_ft.zip") as archive:
        archive.extractall(root / "sources")
    split = root / "lmdb" / "train"
    serialize_split("raw_tsv", root / "sources", "train", split, entry={"root": "demo_ft"}, progress=False)
    model_dir = prepare_initial_model(
        "ernie_vil", "tiny", root / "init_model", vocab_texts=vocab_texts_from_split(split), seed=0
    )
    return {"root": root, "split": split, "model_dir": model_dir}


def _args(demo, work: Path, final: Path, **hparams) -> list[str]:
    return [
        "--model-dir", str(demo["model_dir"]), "--train-data", str(demo["split"]),
        "--output-dir", str(work), "--final-dir", str(final),
        "--hparams-json", json.dumps({**BASE_HPARAMS, **hparams}),
    ]


def _worker_logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(log_dir.glob("workerlog.*")))


def _run(demo, work: Path, final: Path, **hparams) -> dict:
    """One fine-tuning job as the workflow runs it: launch_finetune in this process, ranks beneath."""
    try:
        return launch_finetune(
            demo["model_dir"], demo["split"], work, final, n_ranks=N_RANKS, use_gpu=False,
            hparams={**BASE_HPARAMS, **hparams}, train_log_copy=work.parent / f"{work.name}_train_log.jsonl",
        )
    except FinetuneError as exc:
        raise AssertionError(f"{exc}\n{_worker_logs(work / 'launch_logs')}") from None


def _wait_for_checkpoint(work: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not is_complete_checkpoint(work / f"checkpoint-{step}"):
        assert proc.poll() is None, f"training ended early:\n{_worker_logs(work / 'launch_logs')}"
        assert time.monotonic() < deadline, f"no complete checkpoint-{step} within {timeout} s"
        time.sleep(0.1)


def _assert_ranks_exit(work: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _rank_processes(str(work)):
        assert time.monotonic() < deadline, f"rank processes still running: {_rank_processes(str(work))}"
        time.sleep(0.2)


def _expected_lr(step: int, base: float, warmup: int, total: int) -> float:
    """Learning rate applied in 1-based ``step`` by linear warmup + cosine decay (scheduler index step-1)."""
    k = step - 1
    if k < warmup:
        return base * k / max(1, warmup)
    progress = (k - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _train_records(records):
    return [r for r in records if r["event"] == "train"]


# -- data path --------------------------------------------------------------------------------------


def test_pair_dataset_on_a_real_split(demo):
    family = get_family("ernie_vil")
    tokenizer = family.load_tokenizer(demo["model_dir"])
    transform = ImageTransform(image_size=64, train=True, hflip=False)
    dataset = PairDataset(demo["split"], transform, FamilyTokenizer("ernie_vil", tokenizer), max_len=16)
    store = shared_store(demo["split"])
    # One store per split and process: py-lmdb refuses a second open of the same environment.
    assert shared_store(demo["split"]) is store
    release_store(demo["split"])
    store = shared_store(demo["split"])
    assert len(dataset) == store.num_pairs == 200
    pair = store.pair(5)
    item = dataset[5]
    assert (item["image_id"], item["text_id"]) == (pair.image_id, pair.text_id)
    assert item["pixel_values"].shape == (3, 64, 64) and item["pixel_values"].dtype == np.float32
    # Demo captions are longer than 16 tokens: truncated, still closed by [SEP].
    assert len(item["input_ids"]) == 16 and item["input_ids"][-1] == tokenizer.sep_token_id
    expected = family.tokenize(tokenizer, [pair.text], max_len=16)["input_ids"][0]
    np.testing.assert_array_equal(item["input_ids"], expected)

    short = PairDataset(demo["split"], transform, FamilyTokenizer("ernie_vil", tokenizer), max_len=64)
    batch = PairCollator(tokenizer.pad_token_id, keep_ids=True)([short[0], short[1], dataset[2]])
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids", "text_ids"}
    lengths = batch["attention_mask"].sum(axis=1)
    assert batch["input_ids"].shape[1] == lengths.max() and lengths[2] == 16
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()


def test_extraction_loaders_keep_ids_with_workers(demo):
    family = get_family("ernie_vil")
    tokenizer = family.load_tokenizer(demo["model_dir"])
    transform = ImageTransform(image_size=64)
    store = shared_store(demo["split"])
    image_ids, texts = store.image_ids(), store.texts()
    expected_pixels = {i: transform(store.open_image(i)) for i in image_ids[:3] + image_ids[-2:]}
    seen_images = []
    for batch in image_loader(demo["split"], transform, batch_size=16, num_workers=2):
        ids = batch["image_ids"].numpy().tolist()
        seen_images += ids
        for row, image_id in enumerate(ids):
            if image_id in expected_pixels:
                np.testing.assert_allclose(batch["pixel_values"][row].numpy(), expected_pixels[image_id], atol=1e-6)
    assert seen_images == image_ids
    seen_texts = []
    for batch in text_loader(demo["split"], FamilyTokenizer("ernie_vil", tokenizer), max_len=52, batch_size=64, num_workers=2):
        seen_texts += batch["text_ids"].numpy().tolist()
        assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert seen_texts == [t.text_id for t in texts]


def test_hparams_are_validated():
    assert resolve_hparams()["learning_rate"] == 5e-5 and resolve_hparams()["per_device_train_batch_size"] == 128
    with pytest.raises(ConfigError, match="unknown fine-tuning hyperparameter"):
        resolve_hparams({"lr": 1.0})
    with pytest.raises(ConfigError, match="per_device_train_batch_size"):
        resolve_hparams({"per_device_train_batch_size": 0})
    with pytest.raises(ConfigError, match="hflip"):
        resolve_hparams({"hflip": "no"})
    with pytest.raises(ConfigError, match="save_total_limit"):
        resolve_hparams({"save_total_limit": 1})
    for bad in ({"heads": 0}, {"heads": True}, ["heads"], {"heads": "5"}):
        with pytest.raises(ConfigError, match="lr_multipliers"):
            resolve_hparams({"lr_multipliers": bad})
    assert resolve_hparams({"lr_multipliers": {"heads": 5}})["lr_multipliers"] == {"heads": 5.0}
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ConfigError, match="warmup_ratio"):
            resolve_hparams({"warmup_ratio": bad})


def test_warmup_ratio_sets_the_schedules_warmup(tmp_path):
    """The Trainer's scheduler warms up over int(ratio x steps) steps (19 of 390 at 0.05, as the
    authors' int(max_steps * warmup_steps)); warmup_steps > 0 wins over a ratio."""
    from types import SimpleNamespace

    from paddlenlp.trainer import Trainer

    def schedule(overrides, steps=390):
        args = training_arguments(resolve_hparams({"learning_rate": 1.0, "lr_scheduler_type": "linear", **overrides}),
                                  tmp_path, device="cpu", recompute=False, dataloader_num_workers=0)
        scheduler = Trainer.create_scheduler(SimpleNamespace(args=args, lr_scheduler=None), steps)
        rates = []
        for _ in range(steps):
            rates.append(scheduler.get_lr())
            scheduler.step()
        return rates

    ratio = schedule({"warmup_steps": 0, "warmup_ratio": 0.05})
    assert ratio[18] == pytest.approx(18 / 19) and ratio[19] == pytest.approx(1.0) and ratio[20] < 1.0
    fixed = schedule({"warmup_steps": 7, "warmup_ratio": 0.05})
    assert fixed[6] == pytest.approx(6 / 7) and fixed[7] == pytest.approx(1.0)
    assert schedule({"warmup_steps": 0})[0] == pytest.approx(1.0)


def test_launch_command_forms(tmp_path):
    cpu = launch_command(2, False, tmp_path / "logs", ["--model-dir", "m"], python="py")
    assert cpu == [
        "py", "-m", "paddle.distributed.launch", "--log_dir", str(tmp_path / "logs"), "--max_restart", "0",
        "--nproc_per_node", "2", "py", "-m", "vlretrieval.training.finetune", "--model-dir", "m", "--device", "cpu",
    ]
    gpu = launch_command(4, True, "logs", ["--model-dir", "m"], python="py")
    assert gpu[gpu.index("--gpus") + 1] == "0,1,2,3" and "--device" not in gpu


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_finetune_logs_loss_and_schedule(demo):
    work, final = demo["root"] / "work_a", demo["root"] / "final_a"
    info = _run(demo, work, final, max_steps=4, save_steps=2)
    assert info["global_step"] == 4
    assert (demo["root"] / "work_a_train_log.jsonl").read_bytes() == (work / TRAIN_LOG).read_bytes()

    records = read_train_log(work / TRAIN_LOG)
    start = records[0]
    assert start["event"] == "start" and start["world_size"] == N_RANKS and start["global_batch_size"] == 16
    assert start["max_steps"] == 4 and start["hparams"]["learning_rate"] == 1e-3
    steps = _train_records(records)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert math.isfinite(record["loss"]) and 0.0 < record["loss"] < 10.0
        assert record["lr"] == pytest.approx(_expected_lr(record["step"], 1e-3, 2, 4), rel=1e-6, abs=1e-12)
        assert record["samples_per_second"] > 0 and 1.0 <= record["logit_scale"] <= 100.0
    # Warmup starts at zero, peaks after the warmup steps, then decays.
    assert steps[0]["lr"] == 0.0 and steps[2]["lr"] == pytest.approx(1e-3)
    assert records[-1]["event"] == "end" and records[-1]["step"] == 4

    for step in (2, 4):
        assert is_complete_checkpoint(work / f"checkpoint-{step}")
    info = read_model_info(final)
    assert info["family"] == "ernie_vil" and info["global_step"] == 4
    family = get_family("ernie_vil")
    tuned, initial, last = (family.load_model(p) for p in (final, demo["model_dir"], work / "checkpoint-4"))
    for name, value in tuned.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), last.state_dict()[name].numpy(), err_msg=name)
    assert not np.array_equal(tuned.temperature.numpy(), initial.temperature.numpy())
    assert not list(final.parent.glob(".final_a.*"))


def test_gradient_accumulation_steps_over_several_micro_batches(demo, tmp_path):
    """2 ranks x 4 pairs x 2 micro-batches: each optimizer step consumes 16 of the 200 pairs."""
    work, final = demo["root"] / "work_acc", demo["root"] / "final_acc"
    info = _run(demo, work, final, max_steps=2, save_steps=2, per_device_train_batch_size=4,
                gradient_accumulation_steps=2)
    assert info["global_step"] == 2
    records = read_train_log(work / TRAIN_LOG)
    assert records[0]["global_batch_size"] == 16 and records[0]["gradient_accumulation_steps"] == 2
    assert records[0]["train_pairs"] == 200
    # CPU ranks decode images in the training process by default (dataloader_num_workers null).
    assert records[0]["dataloader_num_workers"] == 0 and records[0]["hparams"]["amp"] is None
    steps = _train_records(records)
    assert [r["step"] for r in steps] == [1, 2]
    # An epoch is the 12 whole optimizer steps of 16 pairs; the 8 pairs that cannot fill a 13th
    # are left out, so that no step accumulates micro-batches of two epochs.
    assert [r["epoch"] for r in steps] == pytest.approx([1 / 12, 2 / 12], abs=1e-4)
    assert all(math.isfinite(r["loss"]) for r in steps)

    with pytest.raises(ConfigError, match="cannot fill one global batch of 240"):
        finetune(demo["model_dir"], demo["split"], tmp_path / "work", tmp_path / "final", device="cpu",
                 hparams={**BASE_HPARAMS, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 30})
    assert not (tmp_path / "final").exists()


def _rank_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "vlretrieval.training.finetune" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_no_dataloader_worker_outlives_its_rank(demo):
    """GPU jobs read with worker processes by default; a finished job must leave none behind."""
    work, final = demo["root"] / "work_workers", demo["root"] / "final_workers"
    info = _run(demo, work, final, max_steps=3, save_steps=1000, dataloader_num_workers=1)
    assert info["global_step"] == 3
    start = next(r for r in read_train_log(work / TRAIN_LOG) if r["event"] == "start")
    assert start["dataloader_num_workers"] == 1
    _assert_ranks_exit(work, timeout=10)


@pytest.mark.slow
def test_killed_runs_resume_from_last_complete_checkpoint(demo):
    work, final = demo["root"] / "work_b", demo["root"] / "final_b"
    # Tiny steps take ~40 ms here: the schedule must outlast the ranks' reaction to a dead launcher
    # (their orphan check polls every 0.5 s), or the second killed run could reach the end.
    long_run = {**BASE_HPARAMS, "max_steps": 90, "save_steps": 3}

    # 1. The workflow's job process (launch_finetune) is killed outright: the launcher it started
    #    gets SIGTERM from the kernel (parent-death signal) and stops its ranks.
    script = (
        "import json, sys\n"
        "from vlretrieval.training.launcher import launch_finetune\n"
        "a = json.loads(sys.argv[1])\n"
        "launch_finetune(a['model'], a['split'], a['work'], a['final'], n_ranks=2, use_gpu=False, hparams=a['hparams'])\n"
    )
    payload = json.dumps({"model": str(demo["model_dir"]), "split": str(demo["split"]), "work": str(work),
                          "final": str(final), "hparams": long_run})
    job = subprocess.Popen([sys.executable, "-c", script, payload], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(work, 3, job)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    _assert_ranks_exit(work)
    first_resume = int(find_resumable_checkpoint(work).name.split("-")[1])

    # 2. The launcher itself is killed outright: it cannot stop anything, the ranks notice on their own.
    cmd = launch_command(N_RANKS, False, work / "launch_logs", _args(demo, work, final, **long_run))
    launcher = subprocess.Popen(
        cmd, env=launch_env(N_RANKS, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_for_checkpoint(work, first_resume + 3, launcher)
    finally:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
    _assert_ranks_exit(work)
    assert not final.exists()

    resumable = find_resumable_checkpoint(work)
    resumed_step = int(resumable.name.split("-")[1])
    assert resumed_step >= first_resume + 3 and resumed_step % 3 == 0
    logged = [r["step"] for r in _train_records(read_train_log(work / TRAIN_LOG))]
    assert logged[:resumed_step] == list(range(1, resumed_step + 1))
    # A checkpoint cut off mid-write (files present, no marker) must be ignored and cleaned up.
    partial = work / f"checkpoint-{resumed_step + 1}"
    partial.mkdir()
    for name in ("config.json", "trainer_state.json", "model_state.pdparams"):
        (partial / name).write_bytes((resumable / name).read_bytes()[:100])

    # 3. A normal rerun of the same recipe continues from the newest complete checkpoint.
    target = long_run["max_steps"]
    assert resumed_step < target, "the killed runs must not have reached the end of the schedule"
    info = _run(demo, work, final, max_steps=long_run["max_steps"], save_steps=long_run["save_steps"])
    assert info["global_step"] == target
    records = read_train_log(work / TRAIN_LOG)
    resumes = [r for r in records if r["event"] == "resume"]
    assert [r["checkpoint"] for r in resumes] == [f"checkpoint-{first_resume}", f"checkpoint-{resumed_step}"]
    assert resumes[-1]["step"] == resumed_step and resumes[-1]["max_steps"] == target
    # Every step exactly once: steps logged after a run's last checkpoint were dropped and redone.
    assert [r["step"] for r in _train_records(records)] == list(range(1, target + 1))
    after = [r for r in _train_records(records) if r["step"] > resumed_step]
    assert all(r["time"] > resumes[-1]["time"] for r in after)
    for record in after:
        assert record["lr"] == pytest.approx(_expected_lr(record["step"], 1e-3, 2, target), rel=1e-6, abs=1e-12)
    assert not partial.exists()
    trainer_state = json.loads((work / f"checkpoint-{target}" / "trainer_state.json").read_text())
    assert trainer_state["global_step"] == target
    assert is_complete_checkpoint(work / f"checkpoint-{target}")
