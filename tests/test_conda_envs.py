"""The conda environments carry exactly the lock's pins."""

import yaml

from vlretrieval.conda_envs import REPO, lock_pins, render


def test_committed_envs_match_the_lock():
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    for name, gpu in (("cpu.yaml", False), ("gpu.yaml", True)):
        committed = (REPO / "envs" / name).read_text(encoding="utf-8")
        assert committed == render(lock, gpu=gpu), f"envs/{name} is stale: run python -m vlretrieval.conda_envs"


def test_gpu_env_swaps_only_paddle():
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    cpu = yaml.safe_load(render(lock, gpu=False))["dependencies"][-1]["pip"]
    gpu = [p for p in yaml.safe_load(render(lock, gpu=True))["dependencies"][-1]["pip"] if not p.startswith("--")]
    assert cpu == lock_pins(lock)
    assert [p for p in cpu if not p.startswith("paddlepaddle==")] == [p for p in gpu if not p.startswith("paddlepaddle-gpu==")]
    assert "paddlepaddle-gpu==3.3.1" in gpu and "paddlepaddle==3.3.1" in cpu
