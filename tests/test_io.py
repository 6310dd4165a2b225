"""Atomic outputs: nothing half-written under the final name, and no staging left after a kill."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from vlretrieval.io import atomic_directory, atomic_open, remove_abandoned_staging


def test_failed_block_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("second, half done")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "f.json") as handle:
            handle.write("{")
            raise RuntimeError("boom")
    assert not (tmp_path / "f.json").exists()


def test_staging_of_a_killed_writer_is_removed_by_the_next_one(tmp_path):
    out = tmp_path / "split"
    script = (
        "import sys, time\n"
        "from vlretrieval.io import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'big').write_bytes(b'x' * 1000)\n"
        "    print('staged', flush=True)\n"
        "    time.sleep(60)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "staged"
    staged = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(staged) == 1
    # a live writer's staging is left alone
    assert remove_abandoned_staging(out) == []
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=10)
    assert staged[0].exists(), "SIGKILL skips cleanup, so the staging directory is still there"
    with atomic_directory(out) as tmp:
        (tmp / "done").write_text("ok")
    assert not staged[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]
