"""Benchmark: parallel image download (url_csv corpora) against one thread, over a slow loopback host.

A loopback HTTP server serves distinct noise JPEGs and waits ``--latency`` seconds before each
answer, standing in for the round trip to a remote image host. The same images are then fetched
by :class:`vlretrieval.data.url_corpus.ImageDownloader` (fetch, filter decode, atomic rename into
the cache) with 1 thread and with ``--threads`` threads, each into a fresh cache; finally the
many-thread cache is read again, which is what a resumed run costs (no request, decode only).

Usage::

    python bench/bench_url_download.py [--images 300] [--threads 16] [--latency 0.03] [--image-kb 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlretrieval.data.url_corpus import ImageDownloader  # noqa: E402

from benchjson import write_figures  # noqa: E402


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        data = self.server.images.get(self.path)
        time.sleep(self.server.latency)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Many threads connect at once; the default backlog of 5 would make the kernel drop SYNs.
    request_queue_size = 256


def _images(n: int, image_kb: float, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    probe = 96
    size = len(_jpeg(rng, probe))
    side = max(32, int(probe * (image_kb * 1024 / size) ** 0.5))
    return {f"/img/{i:06d}.jpg": _jpeg(rng, side) for i in range(n)}


def _jpeg(rng: random.Random, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


def _run(base: str, paths: list[str], cache: Path, threads: int, timeout: float) -> tuple[float, int]:
    downloader = ImageDownloader(cache, min_side=16, threads=threads, timeout=timeout, retries=2, backoff=0.1)
    tasks = [(Path(path).name, base + path) for path in paths]
    start = time.perf_counter()
    kept = sum(outcome.kept for outcome in downloader.run(tasks))
    return time.perf_counter() - start, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.03, help="seconds the server waits before each answer")
    parser.add_argument("--image-kb", type=float, default=15.0, help="approximate size of each JPEG")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args(argv)

    images = _images(args.images, args.image_kb, args.seed)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.images, server.latency = images, args.latency
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    work = Path(tempfile.mkdtemp(prefix="bench_url_download.", dir=args.dir))
    try:
        paths = sorted(images)
        one_s, kept_one = _run(base, paths, work / "one", 1, args.timeout)
        many_s, kept_many = _run(base, paths, work / "many", args.threads, args.timeout)
        resume_s, kept_resume = _run(base, paths, work / "many", args.threads, args.timeout)
        assert kept_one == kept_many == kept_resume == len(paths), (kept_one, kept_many, kept_resume)

        n = len(paths)
        mean_kb = sum(len(v) for v in images.values()) / n / 1024
        results = {
            "images": n, "mean_image_kb": round(mean_kb, 1), "latency_s": args.latency, "threads": args.threads,
            "cpus": os.cpu_count(),
            "one_thread_images_per_s": round(n / one_s, 1), "many_threads_images_per_s": round(n / many_s, 1),
            "ratio_many_over_one": round(one_s / many_s, 1),
            "resume_images_per_s": round(n / resume_s, 1),
            "latency_bound_one_thread_images_per_s": round(1 / args.latency, 1) if args.latency else None,
        }
        print(f"{n} distinct JPEGs (~{mean_kb:.1f} KB), server latency {args.latency * 1000:.0f} ms per request, "
              f"{os.cpu_count()} CPUs")
        print(f"1 thread         : {one_s:7.2f} s  {n / one_s:8.1f} images/s"
              + (f"  (latency alone allows {1 / args.latency:.1f}/s)" if args.latency else ""))
        print(f"{args.threads:2d} threads       : {many_s:7.2f} s  {n / many_s:8.1f} images/s")
        print(f"ratio {args.threads} threads / 1: {one_s / many_s:.1f}x")
        print(f"resumed run ({args.threads} threads, every image cached, decode only, no request): "
              f"{resume_s:.2f} s  {n / resume_s:.1f} images/s")
        figures = {"one_thread_s": one_s, "many_threads_s": many_s, "resume_s": resume_s,
                   **{name: value for name, value in results.items()
                      if name.endswith(("_per_s", "_over_one")) and value is not None}}
        write_figures(args.json, "bench_url_download", figures, images=n, mean_image_kb=results["mean_image_kb"],
                      latency_s=args.latency, threads=args.threads, image_kb=args.image_kb, seed=args.seed)
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
