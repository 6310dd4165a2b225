"""Screenshots of the Snakemake report and of the MLflow UI for docs/, taken in headless Chromium.

Run from the repository against a finished workflow tree (the demo after `make demo`, or any
directory `snakemake --directory` ran in):

    .venv/bin/python ci/screenshots.py --tree . --out docs/img

It installs Chromium from Debian when missing (as root: apt-get install chromium fonts-noto-cjk, the
fonts for the Chinese captions), builds the tree's report (`snakemake --report`), and opens a copy of
it at a given result: the report is a single-page app whose views have no URL, so the copy carries
one line of script that selects the result after loading. It then starts `mlflow ui` on loopback
against the tree's store and takes the experiment's runs table (model-training view) and a run page.

Files written to --out: report_leaderboard.png, report_gallery.png, mlflow_runs.png, mlflow_run.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM_PACKAGES = ["chromium", "fonts-noto-cjk"]


def ensure_chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("chromium is not installed; as root: apt-get update && apt-get install -y "
                         + " ".join(CHROMIUM_PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", *CHROMIUM_PACKAGES], check=True, env=env)
    return shutil.which("chromium")


def screenshot(chromium: str, url: str, out: Path, *, width: int, height: int, wait_ms: int,
               attempts: int = 3) -> None:
    """One headless screenshot of ``url`` after ``wait_ms`` of virtual time for its scripts to render.

    Virtual time stands still while requests are pending, so a served app that keeps polling its
    server can hold it long; ``--timeout`` caps that wait in real time, and a browser that still has
    not exited well after it is stopped (its whole session) and started again.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory(prefix="chromium-profile-", ignore_cleanup_errors=True) as profile:
            browser = subprocess.Popen(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
                 f"--timeout={4 * wait_ms}", f"--screenshot={out}", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                browser.wait(timeout=4 * wait_ms / 1000 + 60)
            except subprocess.TimeoutExpired:
                os.killpg(browser.pid, signal.SIGKILL)
                browser.wait()
        if out.exists() and out.stat().st_size > 0:
            print(f"{out}: {url[:100]}")
            return
        print(f"{out}: no screenshot of {url} on attempt {attempt} of {attempts}", file=sys.stderr)
    raise SystemExit(f"chromium wrote no screenshot of {url} to {out}")


def build_report(tree: Path) -> Path:
    report = tree / "report.html"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tree),
                    "--cores", "1", "--report", str(report)], check=True, env=env)
    return report


def report_opened_at(report: Path, result: str, category: str, subcategory: str, out_dir: Path) -> Path:
    """A copy of the report that shows ``result`` (a path as registered, e.g. results/summary.html)."""
    # React renders the app after the page loads, so wait until it exists before selecting the result.
    select = (
        "<script>var selectResult = setInterval(function () {"
        " if (typeof app === 'undefined' || !app) { return; }"
        " clearInterval(selectResult);"
        f" var key = {json.dumps(result)};"
        f" app.setView({{navbarMode: 'subcategory', category: {json.dumps(category)},"
        f"  subcategory: {json.dumps(subcategory)},"
        "  content: 'html', contentPath: results[key].data_uri, resultPath: key}); }, 100);</script>"
    )
    page = report.read_text(encoding="utf-8")
    if f'"{result}"' not in page:
        raise SystemExit(f"{report} has no result {result}")
    copy = out_dir / f"report_at_{Path(result).stem}.html"
    # The last </body>: the report's embedded scripts contain the string too.
    head, tag, tail = page.rpartition("</body>")
    copy.write_text(head + select + tag + tail, encoding="utf-8")
    return copy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"mlflow ui exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer at {url} within {timeout:.0f} s")


def mlflow_pages(tree: Path) -> tuple[str, str, str, str]:
    """The tracking URI of the tree's store, the experiment's id, a fine-tuned stage's run id, and the
    runs page's query: the model-training view, with the tracked metric columns when the store has them."""
    from mlflow.tracking import MlflowClient

    from vlretrieval.tracking.mlflow_tracking.store import MODEL_TRAINING_VIEW_QUERY, RUNS_VIEW_KEY, RUNS_VIEW_TAG

    uri = f"sqlite:///{(tree / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("vlretrieval")
    if experiment is None:
        raise SystemExit(f"{tree / 'mlflow.db'} has no experiment vlretrieval")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'finetuned'", max_results=1)
    if not runs:
        runs = client.search_runs([experiment.experiment_id], max_results=1)
    query = MODEL_TRAINING_VIEW_QUERY
    if RUNS_VIEW_TAG in experiment.tags:
        query += f"&viewStateShareKey={RUNS_VIEW_KEY}"
    return uri, experiment.experiment_id, runs[0].info.run_id, query


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, required=True, help="the finished workflow's working directory")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--gallery", default=None, help="the gallery to show (default: the first in the report)")
    parser.add_argument("--wait-ms", type=int, default=8000, help="virtual time a page of the report gets to render")
    parser.add_argument("--mlflow-wait-ms", type=int, default=30000, help="virtual time an MLflow page gets to render")
    parser.add_argument("--pages", choices=("all", "report", "mlflow"), default="all",
                        help="take only the report's or only MLflow's screenshots")
    parser.add_argument("--report", type=Path, default=None,
                        help="an already built report.html of the tree (default: build it with snakemake --report)")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    chromium = ensure_chromium()
    if args.pages in ("all", "report"):
        report_screenshots(chromium, tree, args)
    if args.pages in ("all", "mlflow"):
        mlflow_screenshots(chromium, tree, args)
    return 0


def report_screenshots(chromium: str, tree: Path, args: argparse.Namespace) -> None:
    report = args.report.resolve() if args.report else build_report(tree)
    with tempfile.TemporaryDirectory(prefix="screenshots-") as scratch:
        scratch = Path(scratch)
        gallery = args.gallery or next(
            str(path.relative_to(tree)) for path in sorted((tree / "results" / "galleries").glob("*/*.html")))
        # Results without a subcategory are listed under "Other"; a gallery's is its pair, from its path.
        pair = " / ".join(Path(gallery).with_suffix("").parts[-2:])
        for name, result, category, subcategory, height in (
                ("report_leaderboard", "results/summary.html", "Leaderboard", "Other", 600),
                ("report_gallery", gallery, "Retrievals", pair, 1400)):
            page = report_opened_at(report, result, category, subcategory, scratch)
            screenshot(chromium, page.as_uri(), args.out / f"{name}.png", width=1800, height=height,
                       wait_ms=args.wait_ms)


def mlflow_screenshots(chromium: str, tree: Path, args: argparse.Namespace) -> None:
    uri, experiment_id, run_id, runs_query = mlflow_pages(tree)
    port = free_port()
    # A session of its own, so stopping it also stops the web server workers it starts.
    server = subprocess.Popen([str(BIN / "mlflow"), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], cwd=tree, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(base + "/health", server)
        screenshot(chromium, f"{base}/#/experiments/{experiment_id}/runs?{runs_query}", args.out / "mlflow_runs.png",
                   width=1800, height=800, wait_ms=args.mlflow_wait_ms)
        screenshot(chromium, f"{base}/#/experiments/{experiment_id}/runs/{run_id}", args.out / "mlflow_run.png",
                   width=1800, height=1100, wait_ms=args.mlflow_wait_ms)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    raise SystemExit(main())
