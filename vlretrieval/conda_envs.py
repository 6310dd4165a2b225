"""The conda environments in ``envs/`` are rendered from ``requirements.lock``.

Snakemake copies an environment file into ``.snakemake/conda/`` before creating it, so the file
cannot refer to the lock by a relative path; it carries the pins itself. A test checks that the
committed files equal what this module renders, so they never drift from the lock.

    python -m vlretrieval.conda_envs      # rewrite envs/cpu.yaml and envs/gpu.yaml
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PADDLE_CPU = "paddlepaddle=="
# CUDA 11.8 wheels; pick the index that matches the cluster's driver.
GPU_INDEX = "https://www.paddlepaddle.org.cn/packages/stable/cu118/"


def lock_pins(lock_text: str) -> list[str]:
    return [line.strip() for line in lock_text.splitlines() if line.strip() and not line.startswith("#")]


def render(lock_text: str, *, gpu: bool) -> str:
    pins = lock_pins(lock_text)
    if gpu:
        pins = [pin.replace(PADDLE_CPU, "paddlepaddle-gpu==", 1) if pin.startswith(PADDLE_CPU) else pin for pin in pins]
    kind = "CUDA machines (the CUDA build of Paddle)" if gpu else "CPU machines"
    lines = [
        f"# Environment for `snakemake --sdm conda` on {kind}.",
        "# Rendered from requirements.lock by `python -m vlretrieval.conda_envs`; do not edit by hand.",
        "# The rules put this checkout on PYTHONPATH, so the package itself needs no install here.",
        "channels:",
        "  - conda-forge",
        "  - nodefaults",
        "dependencies:",
        "  - python=3.11",
        "  - pip",
        "  - pip:",
    ]
    if gpu:
        lines.append(f"      - --extra-index-url {GPU_INDEX}")
    lines += [f"      - {pin}" for pin in pins]
    return "\n".join(lines) + "\n"


def main() -> None:
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    for name, gpu in (("cpu.yaml", False), ("gpu.yaml", True)):
        (REPO / "envs" / name).write_text(render(lock, gpu=gpu), encoding="utf-8")


if __name__ == "__main__":
    main()
