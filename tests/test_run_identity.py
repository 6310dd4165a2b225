"""Checkpoints of one recipe are never resumed by a run with another recipe."""

from __future__ import annotations

import json

from vlretrieval.training.checkpoints import RUN_IDENTITY_FILE, TRAIN_LOG, claim_work_dir


def _fake_checkpoint(work, step):
    path = work / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model_state.pdparams").write_bytes(b"weights")
    return path


def test_same_identity_keeps_checkpoints(tmp_path):
    identity = {"hparams": {"learning_rate": 5e-4}, "ranks": 2}
    assert claim_work_dir(tmp_path, identity) is False
    checkpoint = _fake_checkpoint(tmp_path, 50)
    (tmp_path / TRAIN_LOG).write_text('{"event": "train", "step": 1}\n')
    assert claim_work_dir(tmp_path, identity) is False
    assert checkpoint.is_dir()
    assert (tmp_path / TRAIN_LOG).exists()


def test_changed_identity_discards_checkpoints_and_log(tmp_path):
    claim_work_dir(tmp_path, {"hparams": {"learning_rate": 1e-3}, "ranks": 2})
    old = _fake_checkpoint(tmp_path, 300)
    (tmp_path / TRAIN_LOG).write_text('{"event": "train", "step": 300}\n')
    new_identity = {"hparams": {"learning_rate": 5e-4}, "ranks": 2}
    assert claim_work_dir(tmp_path, new_identity) is True
    assert not old.exists()
    assert not (tmp_path / TRAIN_LOG).exists()
    assert json.loads((tmp_path / RUN_IDENTITY_FILE).read_text()) == new_identity


def test_identity_ignores_bookkeeping_but_not_the_recipe(tmp_path):
    from vlretrieval.training.checkpoints import run_identity
    from vlretrieval.training.hparams import resolve_hparams

    model, data = tmp_path / "model", tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    model.mkdir()
    (model / "model_state.pdparams").write_bytes(b"w")
    (data / "texts.jsonl").write_text("{}\n")
    (data / "imgs" / "data.mdb").write_bytes(b"db")
    base = run_identity(model, data, resolve_hparams({"max_steps": 100}), 2)
    assert run_identity(model, data, resolve_hparams({"max_steps": 100, "save_steps": 7, "logging_steps": 5}), 2) == base
    # a longer schedule stretches the cosine decay, so it is a different run
    assert run_identity(model, data, resolve_hparams({"max_steps": 300}), 2) != base
    assert run_identity(model, data, resolve_hparams({"max_steps": 100, "learning_rate": 1e-4}), 2) != base
    assert run_identity(model, data, resolve_hparams({"max_steps": 100}), 1) != base
    (model / "model_state.pdparams").write_bytes(b"other weights")
    assert run_identity(model, data, resolve_hparams({"max_steps": 100}), 2) != base
