"""Benchmark of exact top-k ranking at COCO 5K evaluation scale.

Times three ways of producing text-to-image top-k lists from random L2-normalised float32
features (default 25,000 texts x 5,000 images x 768 dims):

(a) the project: ``vlretrieval.retrieval.topk.topk_search``;
(b) the reference algorithm: per text, a 1 x N product and a full sort of the N scores. It is
    timed on a subsample of queries and extrapolated linearly (its cost per query is constant);
    numpy's argsort stands in for the reference's Python ``sorted`` over tuples, which only
    flatters the reference;
(c) the floor: one bare ``texts @ images.T`` product with no selection at all, on the BLAS the
    project uses (``vlretrieval.retrieval.blas``) and every core; numpy's own ``@`` is timed too;
(d) the peer a user would otherwise pick: faiss's exact ``IndexFlatIP`` (building the index and
    searching it), on the same features and the same number of threads, as installed; and again
    in a subprocess with ``OPENBLAS_CORETYPE`` set to the kernel the project's BLAS runs, when
    faiss's bundled OpenBLAS picked another one (``project_over_faiss_same_kernel``);
(e) both directions from one product (``topk_search_both``: every text's top k images and every
    image's top k texts), what the workflow's ranking step runs.

Goals (issue 19): ``project_over_bare`` <= 1.25 and ``project_over_faiss`` <= 1.0, wall clock,
(a), (c) and (d) timed interleaved in one run, best of ``--repeat``.

It also reports the peak memory of (a), measured two ways, against the size of the full score
matrix that (a) avoids materialising.

    python bench/bench_topk.py --json bench/results/bench_topk.json   # defaults
    python bench/bench_topk.py --texts 5000 --images 1000 --sweep 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlretrieval.config import MODELS_SCHEMA, schema_default
from vlretrieval.retrieval.features import FeatureSet
from vlretrieval.retrieval.blas import BLAS, BLAS_LIBRARY, inner_products
from vlretrieval.retrieval.topk import (
    DEFAULT_CHUNK_SIZE,
    PRODUCT_ROWS,
    RANKING_THREADS,
    topk_search,
    topk_search_both,
)

from benchjson import write_figures

MB = 1024 * 1024


def random_unit_rows(rng: np.random.Generator, n: int, dim: int, block: int = 4096) -> np.ndarray:
    """Random unit rows, generated block by block so generation adds no peak memory of its own."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        rows = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start:start + rows.shape[0]] = rows
    return out


def make_sets(args: argparse.Namespace) -> tuple[FeatureSet, FeatureSet]:
    rng = np.random.default_rng(args.seed)
    texts = FeatureSet(np.arange(args.texts, dtype=np.int64), random_unit_rows(rng, args.texts, args.dim))
    images = FeatureSet(np.arange(args.images, dtype=np.int64) + 10**6, random_unit_rows(rng, args.images, args.dim))
    return texts, images


@dataclass
class Timing:
    """Best wall-clock and best CPU time (all threads of this process) over the runs."""

    wall: float = math.inf
    cpu: float = math.inf

    def run(self, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        self.wall = min(self.wall, time.perf_counter() - wall)
        self.cpu = min(self.cpu, time.process_time() - cpu)
        return result

    def scaled(self, factor: float) -> "Timing":
        return Timing(self.wall * factor, self.cpu * factor)


def reference_topk(texts: FeatureSet, images: FeatureSet, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query: one 1 x N product, then a full sort of all N scores."""
    out = np.empty((rows.size, k), dtype=np.int64)
    out_scores = np.empty((rows.size, k), dtype=np.float32)
    gallery_t = images.vectors.T
    for i, row in enumerate(rows):
        scores = texts.vectors[row:row + 1] @ gallery_t
        order = np.argsort(-scores[0], kind="stable")
        out[i] = images.ids[order[:k]]
        out_scores[i] = scores[0, order[:k]]
    return out, out_scores


def literal_reference_topk(texts: FeatureSet, images: FeatureSet, k: int, rows: np.ndarray) -> list[list[int]]:
    """The reference script's own selection: (id, score) tuples sorted in Python."""
    gallery_t = images.vectors.T
    image_ids = images.ids.tolist()
    out = []
    for row in rows:
        scores = (texts.vectors[row:row + 1] @ gallery_t)[0].tolist()
        ranked = sorted(zip(image_ids, scores), key=lambda pair: pair[1], reverse=True)[:k]
        out.append([image_id for image_id, _ in ranked])
    return out


def faiss_search(texts: FeatureSet, images: FeatureSet, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss's exact inner-product index over the images, searched with every text; ids as ours."""
    import faiss

    index = faiss.IndexFlatIP(images.dim)
    index.add(images.vectors)
    scores, positions = index.search(texts.vectors, k)
    return images.ids[positions], scores


def tie_agreement(ids_a: np.ndarray, scores_a: np.ndarray, ids_b: np.ndarray, scores_b: np.ndarray,
                  tolerance: float) -> tuple[int, int, float]:
    """Rows with identical id lists; rows that differ only by order or membership among scores tied
    within ``tolerance`` (so both are exact top-k lists); and the largest score gap at equal rank."""
    gap = np.abs(scores_a - scores_b)
    identical = (ids_a == ids_b).all(axis=1)
    differ = np.flatnonzero(~identical)
    tied = 0
    for row in differ:
        # Each list's k-th score is the boundary; an id only one list holds must sit at that boundary.
        only_a = ~np.isin(ids_a[row], ids_b[row])
        only_b = ~np.isin(ids_b[row], ids_a[row])
        boundary = min(scores_a[row, -1], scores_b[row, -1])
        if gap[row].max() <= tolerance and (scores_a[row, only_a] <= boundary + tolerance).all() \
                and (scores_b[row, only_b] <= boundary + tolerance).all():
            tied += 1
    return int(identical.sum()), tied, float(gap.max()) if gap.size else 0.0


def blas_description() -> str:
    from threadpoolctl import threadpool_info

    return "; ".join(
        f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')}, {p.get('num_threads')} threads, "
        f"{Path(p['filepath']).name})"
        for p in threadpool_info() if p.get("user_api") == "blas"
    )


def blas_architectures() -> tuple[str | None, str | None]:
    """The kernel of the project's BLAS and the kernel of faiss's bundled OpenBLAS."""
    import faiss  # noqa: F401  (loads its OpenBLAS)
    from threadpoolctl import threadpool_info

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    project = BLAS_LIBRARY.get("architecture") if BLAS_LIBRARY else None
    peer = next((p.get("architecture") for p in pools if "faiss" in p["filepath"]), None)
    return project, peer


def faiss_child(args: argparse.Namespace) -> None:
    """Subprocess body: faiss's best wall time over the repeats, as JSON."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    texts, images = make_sets(args)
    timing = Timing()
    for _ in range(args.repeat):
        timing.run(lambda: faiss_search(texts, images, args.k))
    print(json.dumps({"wall": timing.wall, "blas": blas_description()}))


def faiss_same_kernel(args: argparse.Namespace, kernel: str) -> dict:
    cmd = [sys.executable, __file__, "--faiss-child", "--texts", str(args.texts), "--images", str(args.images),
           "--dim", str(args.dim), "--k", str(args.k), "--seed", str(args.seed), "--repeat", str(args.repeat),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**os.environ, "OPENBLAS_CORETYPE": kernel})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tracemalloc_peak(texts: FeatureSet, images: FeatureSet, k: int, chunk_size: int) -> int:
    """Peak bytes numpy allocates during one ranking (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    topk_search(texts, images, k, chunk_size=chunk_size)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_child(args: argparse.Namespace) -> None:
    """Subprocess body: resident memory before one ranking and its peak during it, as JSON.

    On Linux the peak (VmHWM) is reset to the current RSS just before the ranking, so setup
    transients cannot hide the ranking's own peak; elsewhere ru_maxrss is used as is.
    """
    texts, images = make_sets(args)
    # Warm BLAS (its per-thread buffers) and page in the inputs so neither is charged to the ranking.
    inner_products(texts.vectors[:PRODUCT_ROWS], images.vectors, np.empty((PRODUCT_ROWS, args.images), np.float32))
    float(texts.vectors.sum() + images.vectors.sum())
    method = "ru_maxrss"
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        method = "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        pass
    before = _proc_status_kb("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    topk_search(texts, images, args.k, chunk_size=args.chunk_size)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method != "ru_maxrss":
        after = _proc_status_kb("VmHWM") or after
    print(json.dumps({"before_kb": before, "after_kb": after, "method": method}))


def rss_peak(args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", "--texts", str(args.texts), "--images", str(args.images),
           "--dim", str(args.dim), "--k", str(args.k), "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=25_000)
    parser.add_argument("--images", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=schema_default(MODELS_SCHEMA, "eval", "top_k"))
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--reference-sample", type=int, default=2_000,
                        help="queries the reference algorithm is timed on (result extrapolated)")
    parser.add_argument("--literal-sample", type=int, default=200,
                        help="queries the literal Python-sorted reference is timed on (result extrapolated)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved timing runs of (a) and (c); the best of each is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", type=int, nargs="*", default=[],
                        help="also time (a) at these chunk sizes")
    parser.add_argument("--threads", type=int, default=RANKING_THREADS,
                        help="faiss OpenMP threads (default: the cores this process may use, as the project's "
                        "ranking threads and BLAS use)")
    parser.add_argument("--no-faiss", action="store_true", help="skip (d) (faiss-cpu not installed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--faiss-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args)
        return
    if args.faiss_child:
        faiss_child(args)
        return
    if not args.no_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    print(f"python {platform.python_version()}, numpy {np.__version__}, BLAS: {blas_description()}")
    print(f"the project's product: {BLAS}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, cpus={os.cpu_count()}")
    print(f"sizes: {args.texts} texts x {args.images} images x {args.dim} dims, k={args.k}, "
          f"chunk_size={args.chunk_size} (products of {PRODUCT_ROWS} rows)")
    texts, images = make_sets(args)

    # Warm BLAS threads and page in the inputs before anything is timed.
    full = np.empty((args.texts, args.images), dtype=np.float32)
    inner_products(texts.vectors, images.vectors, full)
    texts.vectors[:PRODUCT_ROWS] @ images.vectors.T
    full_bytes = full.nbytes

    load_before = os.getloadavg()
    project, bare, numpy_bare, peer, both = Timing(), Timing(), Timing(), Timing(), Timing()
    # Interleaved, so all see the same background load; the best of each is kept.
    for _ in range(args.repeat):
        query_ids, top_ids, top_scores = project.run(
            lambda: topk_search(texts, images, args.k, chunk_size=args.chunk_size))
        bare.run(lambda: inner_products(texts.vectors, images.vectors, full))
        numpy_bare.run(lambda: np.matmul(texts.vectors, images.vectors.T, out=full))
        if not args.no_faiss:
            faiss_ids, faiss_scores = peer.run(lambda: faiss_search(texts, images, args.k))
        (_, both_ids, _), _ = both.run(
            lambda: topk_search_both(texts, images, args.k, args.k, chunk_size=args.chunk_size))
        if not np.array_equal(both_ids, top_ids):
            raise SystemExit("topk_search_both and topk_search disagree on the text-to-image lists")
    del full

    sample = np.linspace(0, args.texts - 1, num=min(args.reference_sample, args.texts)).astype(np.int64)
    reference_sample = Timing()
    ref_ids, ref_scores = reference_sample.run(lambda: reference_topk(texts, images, args.k, sample))
    reference = reference_sample.scaled(args.texts / sample.size)
    differ = np.flatnonzero((ref_ids != top_ids[sample]).any(axis=1))
    # A 1 x N product and a 256-row block product round differently in the last bit, so two
    # items whose scores agree to ~1e-7 may swap; the score lists show whether that is all it is.
    score_gap = float(np.abs(ref_scores - top_scores[sample]).max()) if sample.size else 0.0
    literal_rows = sample[:: max(1, sample.size // args.literal_sample)][: args.literal_sample]
    literal_sample = Timing()
    literal_sample.run(lambda: literal_reference_topk(texts, images, args.k, literal_rows))
    literal = literal_sample.scaled(args.texts / literal_rows.size)
    load_after = os.getloadavg()

    print()
    print(f"{'':44s} {'wall s':>8s} {'cpu s':>8s}")
    print(f"{'(a) project topk_search':44s} {project.wall:8.3f} {project.cpu:8.3f}  best of {args.repeat}")
    print(f"{'(b) reference: per query 1 x N + np.argsort':44s} {reference.wall:8.3f} {reference.cpu:8.3f}  "
          f"extrapolated from {sample.size} queries ({reference_sample.wall:.3f} s) to {args.texts}")
    print(f"{'(b2) reference as written: Python sorted()':44s} {literal.wall:8.3f} {literal.cpu:8.3f}  "
          f"extrapolated from {literal_rows.size} queries ({literal_sample.wall:.3f} s) to {args.texts}")
    print(f"{'(c) bare product texts @ images.T':44s} {bare.wall:8.3f} {bare.cpu:8.3f}  "
          f"one full product, no selection, best of {args.repeat}")
    print(f"{'(c2) the same with numpy @':44s} {numpy_bare.wall:8.3f} {numpy_bare.cpu:8.3f}  "
          f"numpy's bundled BLAS, best of {args.repeat}")
    if not args.no_faiss:
        print(f"{'(d) faiss IndexFlatIP (add + search)':44s} {peer.wall:8.3f} {peer.cpu:8.3f}  "
              f"{args.threads} OpenMP threads, best of {args.repeat}")
    print(f"{'(e) both directions from one product':44s} {both.wall:8.3f} {both.cpu:8.3f}  "
          f"texts->images and images->texts, best of {args.repeat}")
    print()
    print(f"reference / project = {reference.wall / project.wall:6.1f} wall, {reference.cpu / project.cpu:6.1f} cpu"
          f"   (goal >= 20)")
    print(f"    for scale: reference / bare = {reference.wall / bare.wall:.1f} wall (no exact method that computes "
          f"every score can beat this); reference as written / project = {literal.wall / project.wall:.1f} wall")
    print(f"project / bare      = {project.wall / bare.wall:6.2f} wall, {project.cpu / bare.cpu:6.2f} cpu"
          f"   (goal <= 1.25)")
    print(f"both directions / bare = {both.wall / bare.wall:6.2f} wall (two separate searches would cost about "
          f"{2 * project.wall / bare.wall:.2f})")
    same_kernel = None
    if not args.no_faiss:
        faiss_same, faiss_tied, faiss_gap = tie_agreement(top_ids, top_scores, faiss_ids, faiss_scores, 1e-5)
        print(f"project / faiss     = {project.wall / peer.wall:6.2f} wall, {project.cpu / peer.cpu:6.2f} cpu"
              f"   (goal <= 1.0; faiss as installed)")
        project_kernel, faiss_kernel = blas_architectures()
        if project_kernel and faiss_kernel and project_kernel != faiss_kernel:
            same_kernel = faiss_same_kernel(args, project_kernel)
            print(f"project / faiss on the project's kernel = {project.wall / same_kernel['wall']:6.2f} wall "
                  f"(faiss {same_kernel['wall']:.3f} s with OPENBLAS_CORETYPE={project_kernel}; it picked "
                  f"{faiss_kernel} by itself)")
        print(f"faiss top-{args.k} ids identical to the project's on {faiss_same} of {args.texts} queries, "
              f"{faiss_tied} more differ only among scores tied within 1e-5; largest score gap at equal rank "
              f"{faiss_gap:.2e}")
    print(f"top-{args.k} ids identical to the reference on {sample.size - differ.size} of {sample.size} sampled "
          f"queries; largest score difference at equal rank {score_gap:.2e} (last-bit rounding of the products)")
    print(f"1-minute load average before/after the timings: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"(above 0 means other processes shared the {os.cpu_count()} cpus)")

    peak_traced = tracemalloc_peak(texts, images, args.k, args.chunk_size)
    rss = rss_peak(args)
    rss_delta = (rss["after_kb"] - rss["before_kb"]) * 1024
    print()
    print(f"full {args.texts} x {args.images} float32 score matrix: {full_bytes / MB:8.1f} MiB")
    print(f"project peak, tracemalloc (numpy buffers allocated during the call): {peak_traced / MB:8.1f} MiB")
    print(f"project peak, resident-set growth in a fresh subprocess ({rss['method']}): "
          f"{rss_delta / MB:8.1f} MiB")
    print(f"outputs alone (ids int64 + scores float32): {args.texts * args.k * 12 / MB:8.1f} MiB")

    if args.sweep:
        print()
    for chunk in args.sweep:
        timing = Timing()
        for _ in range(args.repeat):
            timing.run(lambda: topk_search(texts, images, args.k, chunk_size=chunk))
        print(f"sweep chunk_size={chunk:6d}: {timing.wall:7.3f} s wall, {timing.cpu:7.3f} s cpu, "
              f"project/bare={timing.wall / bare.wall:5.2f} wall, "
              f"peak={tracemalloc_peak(texts, images, args.k, chunk) / MB:7.1f} MiB")

    figures = {
        "project_over_bare": project.wall / bare.wall,
        "project_s": project.wall,
        "bare_s": bare.wall,
        "numpy_bare_s": numpy_bare.wall,
        "project_cpu_over_bare_cpu": project.cpu / bare.cpu,
        "both_directions_over_bare": both.wall / bare.wall,
        "both_directions_s": both.wall,
        "reference_over_project": reference.wall / project.wall,
        "reference_s": reference.wall,
        "literal_reference_s": literal.wall,
        "project_peak_rss_mib": rss_delta / MB,
        "project_peak_traced_mib": peak_traced / MB,
        "full_score_matrix_mib": full_bytes / MB,
        "reference_identical_queries": sample.size - differ.size,
        "reference_sampled_queries": sample.size,
    }
    if not args.no_faiss:
        import faiss

        figures.update({
            "project_over_faiss": project.wall / peer.wall,
            "faiss_s": peer.wall,
            # Without a different kernel to force, faiss as installed already ran on the project's.
            "project_over_faiss_same_kernel": project.wall / (same_kernel or {"wall": peer.wall})["wall"],
            "faiss_same_kernel_s": (same_kernel or {"wall": peer.wall})["wall"],
            "faiss_identical_queries": faiss_same,
            "faiss_tie_only_differences": faiss_tied,
            "faiss_disagreements": args.texts - faiss_same - faiss_tied,
        })
    write_figures(args.json, "bench_topk", figures, texts=args.texts, images=args.images, dim=args.dim, k=args.k,
                  chunk_size=args.chunk_size, product_rows=PRODUCT_ROWS, repeat=args.repeat, threads=args.threads,
                  blas=blas_description(), product_blas=BLAS, numpy=np.__version__,
                  faiss=None if args.no_faiss else faiss.__version__,
                  load_average_before=load_before[0], load_average_after=load_after[0])
    if not args.no_faiss and figures["faiss_disagreements"]:
        raise SystemExit(f"faiss and the project disagree on {figures['faiss_disagreements']} queries "
                         f"beyond ties; see above")


if __name__ == "__main__":
    main()
