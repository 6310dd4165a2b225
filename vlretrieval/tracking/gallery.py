"""The retrieval gallery of a pair: what each evaluated stage ranks first for a fixed sample of queries.

A seeded sample of text queries and of image queries, the same for every stage of the pair, is read
from the stage folders of ``results/{dataset}/{model}/`` (the prediction files that recall is scored
from, :mod:`vlretrieval.retrieval.predictions`). Each text query is shown with its top images and
each image query with its top captions, the stages side by side and every gold item marked, so a
reader sees where fine-tuning helped and what still fails. Images come from the evaluation split's
LMDB and captions from its texts; the page is one self-contained HTML file with the images inline
as small JPEG thumbnails.

Dual and cross encoders write the same prediction files, so both get the same gallery.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..data.lmdb_store import SplitStore
from ..errors import DataError
from ..io import atomic_open
from ..retrieval.evaluate import I2T_FILE, METRICS_FILE, PAIR_GOLD_FILE, T2I_FILE
from ..retrieval.predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, invert_gold, read_gold_t2i, read_predictions


@dataclass(frozen=True)
class RankedQuery:
    """One query of the gallery: its gold items and, per stage, its best-ranked items and the 1-based
    rank of its first gold item among all the stage's predictions (None when none is predicted)."""

    query_id: int
    gold: frozenset[int]
    top: dict[str, list[int]]
    first_gold_rank: dict[str, int | None]


@dataclass(frozen=True)
class Gallery:
    dataset: str
    model: str
    split: str
    stages: list[str]
    text_queries: list[RankedQuery]
    image_queries: list[RankedQuery]
    top: int  # items shown per query
    predicted_k: int  # how many items each prediction line ranks


def sample_queries(query_ids: Sequence[int], count: int, *, seed: int) -> list[int]:
    """``count`` ids drawn without replacement from ``query_ids`` (all of them when fewer), in ascending
    order; the draw depends only on the set of ids and the seed, so every stage gets the same sample."""
    ids = sorted(set(query_ids))
    return sorted(random.Random(seed).sample(ids, min(count, len(ids))))


def _first_gold_rank(ranked: list[int], gold: frozenset[int]) -> int | None:
    return next((rank for rank, item in enumerate(ranked, start=1) if item in gold), None)


def _ranked_queries(results_dir: Path, stages: list[str], file_name: str, direction: str,
                    gold: dict[int, set[int]], query_ids: list[int], top: int) -> tuple[list[RankedQuery], int]:
    predictions = {}
    predicted_k = None
    for stage in stages:
        path = results_dir / stage / file_name
        predicted = read_predictions(path, direction)
        for query_id in query_ids:
            if query_id not in predicted:
                raise DataError(str(path), f"no prediction line for gold query {query_id}",
                                f"{'text_id' if direction == TEXT_TO_IMAGE else 'image_id'}={query_id}")
        k = len(next(iter(predicted.values())))
        if k < top:
            raise DataError(str(path), f"the gallery shows the top {top} items but the predictions rank only {k}; "
                                       f"lower report.gallery.top or raise the pair's eval.top_k")
        predicted_k = k if predicted_k is None else min(predicted_k, k)
        predictions[stage] = predicted
    queries = []
    for query_id in query_ids:
        query_gold = frozenset(gold[query_id])
        queries.append(RankedQuery(
            query_id=query_id, gold=query_gold,
            top={stage: predictions[stage][query_id][:top] for stage in stages},
            first_gold_rank={stage: _first_gold_rank(predictions[stage][query_id], query_gold) for stage in stages},
        ))
    return queries, int(predicted_k)


def load_gallery(results_dir: str | os.PathLike, *, queries: int, top: int, seed: int) -> Gallery:
    """The gallery's rankings from a pair's results folder: ``queries`` text queries and as many image
    queries, sampled with ``seed`` from the gold, each with its ``top`` items per stage."""
    results_dir = Path(results_dir)
    metrics_path = results_dir / METRICS_FILE
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(str(metrics_path), f"cannot read the pair's metrics: {exc}") from exc
    stages = list(metrics.get("stages", {}))
    if not stages:
        raise DataError(str(metrics_path), "no evaluated stage")
    gold_t2i = read_gold_t2i(results_dir / PAIR_GOLD_FILE)
    gold_i2t = invert_gold(gold_t2i)
    # Separate draws for the two directions, so adding texts never changes which images are sampled.
    text_ids = sample_queries(list(gold_t2i), queries, seed=seed)
    image_ids = sample_queries(list(gold_i2t), queries, seed=seed + 1)
    text_queries, k_t2i = _ranked_queries(results_dir, stages, T2I_FILE, TEXT_TO_IMAGE, gold_t2i, text_ids, top)
    image_queries, k_i2t = _ranked_queries(results_dir, stages, I2T_FILE, IMAGE_TO_TEXT, gold_i2t, image_ids, top)
    return Gallery(dataset=metrics["dataset"], model=metrics["model"], split=metrics["split"], stages=stages,
                   text_queries=text_queries, image_queries=image_queries, top=top, predicted_k=min(k_t2i, k_i2t))


class _SplitMedia:
    """Captions and JPEG thumbnails (as data URIs) of the evaluation split, each made once."""

    def __init__(self, split_dir: str | os.PathLike, thumbnail: int):
        self.split_dir = Path(split_dir)
        self.store = SplitStore(self.split_dir)
        self.captions = {record.text_id: record.text for record in self.store.texts()}
        self.thumbnail = thumbnail
        self._uris: dict[int, str] = {}

    def caption(self, text_id: int) -> str:
        if text_id not in self.captions:
            raise DataError(str(self.split_dir), f"text {text_id} of the predictions is not in the split",
                            f"text_id={text_id}")
        return self.captions[text_id]

    def image_uri(self, image_id: int) -> str:
        if image_id not in self._uris:
            try:
                image = self.store.open_image(image_id)
            except KeyError as exc:
                raise DataError(str(self.split_dir), f"image {image_id} of the predictions is not in the split",
                                f"image_id={image_id}") from exc
            image.thumbnail((self.thumbnail, self.thumbnail))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            self._uris[image_id] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        return self._uris[image_id]

    def close(self) -> None:
        self.store.close()


# Inline, so the page looks the same inside the Snakemake report's frame, in a browser and offline.
_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 16px; color: #222; }
p { max-width: 70em; }
table { border-collapse: collapse; margin-bottom: 24px; }
th, td { padding: 6px 8px; border-bottom: 1px solid #ddd; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.query { max-width: 18em; }
.items { display: flex; gap: 4px; }
figure { margin: 0; text-align: center; font-size: 11px; }
figure img { width: var(--thumb); height: var(--thumb); object-fit: contain; border: 3px solid transparent;
             image-rendering: pixelated; background: #fafafa; }
figure.gold img { border-color: #2a9d3a; }
ol { margin: 0; padding-left: 1.6em; }
li { padding: 1px 3px; }
li.gold { background: #dff3e2; }
.hit { color: #2a7a36; font-weight: 600; }
.miss { color: #b3261e; font-weight: 600; }
.legend { color: #555; }
"""


def _rank_note(rank: int | None, gallery: Gallery) -> str:
    """Green when the gold comes first, red when it is not among the items shown."""
    if rank is None:
        return f'<div class="miss">no gold in the top {gallery.predicted_k}</div>'
    css = "hit" if rank == 1 else "miss" if rank > gallery.top else ""
    return f'<div class="{css}">first gold at rank {rank}</div>'


def _summary(queries: list[RankedQuery], stage: str, top: int) -> str:
    at_one = sum(query.first_gold_rank[stage] == 1 for query in queries)
    in_top = sum(query.first_gold_rank[stage] is not None and query.first_gold_rank[stage] <= top for query in queries)
    return f"{stage}: gold first for {at_one} of {len(queries)}, in the top {top} for {in_top}"


def _text_query_rows(gallery: Gallery, media: _SplitMedia) -> list[str]:
    rows = []
    for query in gallery.text_queries:
        gold = ", ".join(str(i) for i in sorted(query.gold))
        cells = [f'<td class="query" data-text-id="{query.query_id}">{html.escape(media.caption(query.query_id))}'
                 f'<div class="legend">text {query.query_id}; gold image {gold}</div></td>']
        for stage in gallery.stages:
            figures = []
            for rank, image_id in enumerate(query.top[stage], start=1):
                css = ' class="gold"' if image_id in query.gold else ""
                figures.append(f'<figure{css} data-image-id="{image_id}"><img src="{media.image_uri(image_id)}" '
                               f'alt="image {image_id}"><figcaption>{rank}. {image_id}</figcaption></figure>')
            cells.append(f'<td data-stage="{stage}"><div class="items">{"".join(figures)}</div>'
                         f'{_rank_note(query.first_gold_rank[stage], gallery)}</td>')
        rows.append(f'<tr data-query="text-{query.query_id}">{"".join(cells)}</tr>')
    return rows


def _image_query_rows(gallery: Gallery, media: _SplitMedia) -> list[str]:
    rows = []
    for query in gallery.image_queries:
        cells = [f'<td class="query" data-image-id="{query.query_id}"><figure><img src="{media.image_uri(query.query_id)}" '
                 f'alt="image {query.query_id}"><figcaption>image {query.query_id}</figcaption></figure></td>']
        for stage in gallery.stages:
            items = []
            for text_id in query.top[stage]:
                css = ' class="gold"' if text_id in query.gold else ""
                mark = " ✓" if text_id in query.gold else ""
                items.append(f'<li{css} data-text-id="{text_id}">{html.escape(media.caption(text_id))}{mark}</li>')
            cells.append(f'<td data-stage="{stage}"><ol>{"".join(items)}</ol>'
                         f'{_rank_note(query.first_gold_rank[stage], gallery)}</td>')
        rows.append(f'<tr data-query="image-{query.query_id}">{"".join(cells)}</tr>')
    return rows


def render_gallery(gallery: Gallery, split_dir: str | os.PathLike, *, thumbnail: int) -> str:
    """The gallery as one self-contained HTML page, images inline as JPEG thumbnails of at most
    ``thumbnail`` pixels a side."""
    media = _SplitMedia(split_dir, thumbnail)
    try:
        stage_heads = "".join(f"<th>{html.escape(stage)}</th>" for stage in gallery.stages)
        text_rows = _text_query_rows(gallery, media)
        image_rows = _image_query_rows(gallery, media)
    finally:
        media.close()
    title = f"Retrievals: {gallery.dataset} / {gallery.model}"
    text_summary = "; ".join(_summary(gallery.text_queries, stage, gallery.top) for stage in gallery.stages)
    image_summary = "; ".join(_summary(gallery.image_queries, stage, gallery.top) for stage in gallery.stages)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>:root {{ --thumb: {thumbnail}px; }}{_STYLE}</style>\n"
        "</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n"
        f"<p>The same {len(gallery.text_queries)} text queries and {len(gallery.image_queries)} image queries of the "
        f"{html.escape(gallery.split)} split for every stage, drawn with a fixed seed; each stage's top {gallery.top} "
        f"items, best first, from its prediction files. Gold items are framed in green (images) or shaded "
        f"green and ticked (captions); below each list, the rank of the first gold item among the stage's top "
        f"{gallery.predicted_k}.</p>\n"
        f"<h2 id=\"text-to-image\">Text → image</h2>\n<p class=\"legend\">{html.escape(text_summary)}</p>\n"
        f"<table class=\"gallery\" data-direction=\"text_to_image\">\n<thead><tr><th>caption</th>{stage_heads}</tr>"
        "</thead>\n<tbody>\n" + "\n".join(text_rows) + "\n</tbody>\n</table>\n"
        f"<h2 id=\"image-to-text\">Image → text</h2>\n<p class=\"legend\">{html.escape(image_summary)}</p>\n"
        f"<table class=\"gallery\" data-direction=\"image_to_text\">\n<thead><tr><th>image</th>{stage_heads}</tr>"
        "</thead>\n<tbody>\n" + "\n".join(image_rows) + "\n</tbody>\n</table>\n</body>\n</html>\n"
    )


def write_gallery(results_dir: str | os.PathLike, split_dir: str | os.PathLike, out_html: str | os.PathLike, *,
                  queries: int, top: int, seed: int, thumbnail: int) -> Gallery:
    """Read the pair's rankings and write its gallery page atomically; returns what it shows."""
    gallery = load_gallery(results_dir, queries=queries, top=top, seed=seed)
    page = render_gallery(gallery, split_dir, thumbnail=thumbnail)
    with atomic_open(out_html) as handle:
        handle.write(page)
    return gallery


def describe(gallery: Gallery) -> dict[str, Any]:
    """What the gallery shows, as JSON for the job's log."""
    return {
        "dataset": gallery.dataset, "model": gallery.model, "stages": gallery.stages,
        "text_queries": [q.query_id for q in gallery.text_queries],
        "image_queries": [q.query_id for q in gallery.image_queries],
        "first_gold_rank": {
            direction: {stage: [q.first_gold_rank[stage] for q in queries] for stage in gallery.stages}
            for direction, queries in (("text_to_image", gallery.text_queries), ("image_to_text", gallery.image_queries))
        },
    }
