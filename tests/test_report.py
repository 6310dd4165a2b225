"""What the Snakemake report shows: the leaderboard as an HTML table, the retrieval galleries and the
figures' legends; on a real serialized demo split with prediction files of known quality.

The checks of a real ``snakemake --report`` (``check_report``) run on the end-to-end workflows of
test_workflow.py, which build the demo grid and the cross encoders."""

from __future__ import annotations

import base64
import io
import json
import re
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from vlretrieval.errors import DataError
from vlretrieval.retrieval.predictions import invert_gold, read_gold_t2i, read_predictions
from vlretrieval.tracking.gallery import load_gallery, sample_queries, write_gallery
from vlretrieval.tracking.leaderboard import find_metrics, leaderboard_rows, write_leaderboard
from vlretrieval.tracking.plots import MAX_K, loss_figure, recall_figure

from .test_compare import score, write_stage

GALLERY = {"queries": 6, "top": 5, "seed": 0, "thumbnail": 48}


# ---------------------------------------------------------------------------------------------------
# Reading a built report and the pages it embeds
# ---------------------------------------------------------------------------------------------------


def _embedded_results(report_html: str) -> dict:
    """The report's ``results`` object: every registered file with its caption and data URI or path."""
    start = report_html.index('<script id="results">')
    start = report_html.index("{", report_html.index("var results = ", start))
    return json.JSONDecoder().raw_decode(report_html, start)[0]


def report_files(report: Path) -> dict[str, bytes]:
    """The files a built report shows, by the path they were registered under, from a self-contained
    ``report.html`` (data URIs) or a ``report.zip`` (files under report/data/raw/)."""
    if report.suffix == ".zip":
        with zipfile.ZipFile(report) as archive:
            top = archive.namelist()[0].split("/")[0]
            entries = _embedded_results(archive.read(f"{top}/report.html").decode("utf-8"))
            return {path: archive.read(f"{top}/{entry['data_uri']}") for path, entry in entries.items()}
    entries = _embedded_results(report.read_text(encoding="utf-8"))
    return {path: base64.b64decode(entry["data_uri"].split("base64,", 1)[1]) for path, entry in entries.items()}


class _TableParser(HTMLParser):
    """Rows of cell texts of the tables of a page, each cell with its attributes and classes."""

    def __init__(self):
        super().__init__()
        self.tables: list[dict] = []
        self._cell: dict | None = None
        self._item: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": attrs, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"attrs": attrs, "cells": []})
        elif tag in ("td", "th") and self.tables:
            self._cell = {"attrs": attrs, "text": "", "items": []}
            self.tables[-1]["rows"][-1]["cells"].append(self._cell)
        elif tag in ("figure", "li") and self._cell is not None:
            self._item = {"attrs": attrs, "text": "", "img": None}
            self._cell["items"].append(self._item)
        elif tag == "img" and self._item is not None:
            self._item["img"] = attrs["src"]

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._cell = None
        elif tag in ("figure", "li"):
            self._item = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._item is not None:
            self._item["text"] += data


def _tables(page: str) -> list[dict]:
    parser = _TableParser()
    parser.feed(page)
    return parser.tables


def leaderboard_table(page: str) -> list[dict[str, str]]:
    """The leaderboard page's rows as {column: cell text}."""
    (table,) = [t for t in _tables(page) if t["attrs"].get("id") == "leaderboard"]
    header = [cell["text"] for cell in table["rows"][0]["cells"]]
    return [dict(zip(header, (cell["text"] for cell in row["cells"]))) for row in table["rows"][1:]]


def gallery_lists(page: str) -> dict[tuple[str, int, str], list[tuple[int, bool]]]:
    """``{(direction, query id, stage): [(item id, marked gold), ...]}`` of a gallery page."""
    lists = {}
    for table in _tables(page):
        direction = table["attrs"]["data-direction"]
        key = "data-image-id" if direction == "text_to_image" else "data-text-id"
        for row in table["rows"][1:]:
            query_id = int(row["attrs"]["data-query"].split("-")[1])
            for cell in row["cells"][1:]:
                lists[(direction, query_id, cell["attrs"]["data-stage"])] = [
                    (int(item["attrs"][key]), "gold" in item["attrs"].get("class", "")) for item in cell["items"]]
    return lists


def check_gallery_page(page: str, results_dir: Path, *, top: int) -> dict:
    """A gallery page lists, for every stage of the pair, each sampled query's first ``top`` predicted
    items in order, with exactly the gold items marked; the same queries for every stage."""
    metrics = json.loads((results_dir / "metrics.json").read_text(encoding="utf-8"))
    stages = list(metrics["stages"])
    gold_t2i = read_gold_t2i(results_dir / "gold.jsonl")
    golds = {"text_to_image": gold_t2i, "image_to_text": invert_gold(gold_t2i)}
    lists = gallery_lists(page)
    assert lists, "the gallery shows no query"
    for direction, file_name in (("text_to_image", "t2i_predictions.jsonl"), ("image_to_text", "i2t_predictions.jsonl")):
        for stage in stages:
            predictions = read_predictions(results_dir / stage / file_name, direction)
            shown = {query: items for (d, query, s), items in lists.items() if (d, s) == (direction, stage)}
            assert shown, (direction, stage)
            for query, items in shown.items():
                assert [item for item, _ in items] == predictions[query][:top], (direction, stage, query)
                assert [marked for _, marked in items] == [item in golds[direction][query] for item, _ in items]
        queries = [{q for (d, q, s) in lists if (d, s) == (direction, stage)} for stage in stages]
        assert all(q == queries[0] for q in queries), direction
    return lists


def check_report(report: Path, workdir: Path, pairs: list[tuple[str, str]], *, top: int = 5) -> None:
    """A built report shows the leaderboard as a table whose rows carry the pairs' metrics.json figures,
    the CSV beside it, and a gallery per pair that matches the pair's prediction files."""
    files = report_files(report)
    assert "results/summary.csv" in files
    rows = leaderboard_table(files["results/summary.html"].decode("utf-8"))
    for dataset, model in pairs:
        metrics = json.loads((workdir / "results" / dataset / model / "metrics.json").read_text(encoding="utf-8"))
        for stage, scores in metrics["stages"].items():
            (row,) = [r for r in rows if (r["dataset"], r["model"], r["stage"]) == (dataset, model, stage)]
            assert row["T2I R@1"] == f"{scores['text_to_image']['r1']:.2f}"
            assert row["I2T R@10"] == f"{scores['image_to_text']['r10']:.2f}"
            low, high = scores["ci95_mean_recall"]
            assert row["mean recall [95% CI]"] == f"{scores['mean_recall']:.2f} [{low:.1f}, {high:.1f}]"
        page = files[f"results/galleries/{dataset}/{model}.html"].decode("utf-8")
        check_gallery_page(page, workdir / "results" / dataset / model, top=top)


# ---------------------------------------------------------------------------------------------------
# Leaderboard and galleries on a real split
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.lmdb_store import serialize_split

    root = tmp_path_factory.mktemp("report")
    write_demo_archive(DemoSpec(name="demo_rp", seed=4, sizes={"test": 30}), root / "demo.zip")
    zipfile.ZipFile(root / "demo.zip").extractall(root / "dl")
    split_dir = root / "lmdb" / "test"
    serialize_split("raw_tsv", root / "dl", "test", split_dir, entry={"format": "raw_tsv", "root": "demo_rp"},
                    progress=False, workers=1)
    weak = write_stage(root / "work" / "weak", split_dir, 0.1, seed=1)
    strong = write_stage(root / "work" / "strong", split_dir, 0.9, seed=2)
    pair = score(root, split_dir, {"zeroshot": weak, "finetuned": strong}, dataset="demo_rp", model="m1")
    return {"root": root, "split": split_dir, "pair": pair}


def test_leaderboard_html_table_shows_the_markdown_rows(scored, tmp_path):
    rows = leaderboard_rows(find_metrics(scored["root"] / "results"), [], resamples=200, seed=0)
    write_leaderboard(rows, tmp_path / "summary.csv", tmp_path / "summary.md", tmp_path / "summary.html")
    page = (tmp_path / "summary.html").read_text(encoding="utf-8")
    table = leaderboard_table(page)
    markdown = [line for line in (tmp_path / "summary.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("| ")]
    header = [cell.strip() for cell in markdown[0].strip("|").split("|")]
    assert list(table[0]) == header
    assert [list(row.values()) for row in table] == [
        [cell.strip() for cell in line.strip("|").split("|")] for line in markdown[1:]]
    finetuned = next(row for row in table if row["stage"] == "finetuned")
    metrics = json.loads((scored["pair"] / "metrics.json").read_text())["stages"]["finetuned"]
    assert finetuned["model"] == "m1" and finetuned["T2I R@5"] == f"{metrics['text_to_image']['r5']:.2f}"
    # Self-contained: nothing fetched from elsewhere.
    assert not re.search(r"(src|href)=", page)


def test_gallery_lists_each_stages_predictions_with_gold_marked(scored, tmp_path):
    out = tmp_path / "gallery.html"
    gallery = write_gallery(scored["pair"], scored["split"], out, **GALLERY)
    lists = check_gallery_page(out.read_text(encoding="utf-8"), scored["pair"], top=GALLERY["top"])
    assert gallery.stages == ["zeroshot", "finetuned"]
    assert len({q for (d, q, _) in lists if d == "text_to_image"}) == GALLERY["queries"]
    assert len({q for (d, q, _) in lists if d == "image_to_text"}) == GALLERY["queries"]
    # The strong stage puts gold in the top 5 for most queries, the weak one for few.
    marked = {stage: sum(any(m for _, m in items) for (_, _, s), items in lists.items() if s == stage)
              for stage in gallery.stages}
    assert marked["finetuned"] > marked["zeroshot"]
    # The first-gold rank below each list is the rank in the whole prediction line.
    predictions = read_predictions(scored["pair"] / "finetuned" / "t2i_predictions.jsonl", "text_to_image")
    gold = read_gold_t2i(scored["pair"] / "gold.jsonl")
    for query in gallery.text_queries:
        ranked = predictions[query.query_id]
        expected = next((i + 1 for i, item in enumerate(ranked) if item in gold[query.query_id]), None)
        assert query.first_gold_rank["finetuned"] == expected


def test_gallery_images_are_inline_jpeg_thumbnails_of_the_split(scored, tmp_path):
    from vlretrieval.data.lmdb_store import SplitStore

    out = tmp_path / "gallery.html"
    write_gallery(scored["pair"], scored["split"], out, **{**GALLERY, "thumbnail": 32})
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"src=\"(?!data:image/jpeg;base64,)", page)
    first = re.search(r'<figure class="gold" data-image-id="(\d+)"><img src="data:image/jpeg;base64,([^"]+)"', page)
    assert first, "no gold image among the shown top items"
    thumbnail = Image.open(io.BytesIO(base64.b64decode(first.group(2))))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 32
    with SplitStore(scored["split"]) as store:
        original = store.open_image(int(first.group(1))).resize(thumbnail.size)
    # The thumbnail is that image: close to it pixel by pixel (JPEG is lossy), unlike another image.
    difference = sum(abs(a - b) for a, b in zip(original.tobytes(), thumbnail.convert("RGB").tobytes()))
    assert difference / len(original.tobytes()) < 12


def test_gallery_sample_is_seeded_and_shared_by_the_stages(scored):
    first = load_gallery(scored["pair"], queries=5, top=5, seed=0)
    again = load_gallery(scored["pair"], queries=5, top=5, seed=0)
    other = load_gallery(scored["pair"], queries=5, top=5, seed=1)
    ids = [q.query_id for q in first.text_queries]
    assert ids == [q.query_id for q in again.text_queries] != [q.query_id for q in other.text_queries]
    assert sample_queries([3, 1, 2], 10, seed=0) == [1, 2, 3]
    assert sample_queries(list(range(100)), 4, seed=7) == sample_queries(list(reversed(range(100))), 4, seed=7)


def test_gallery_names_the_file_and_query_of_a_missing_prediction(scored, tmp_path):
    import shutil

    pair = tmp_path / "m1"
    shutil.copytree(scored["pair"], pair)
    wanted = load_gallery(pair, **{k: GALLERY[k] for k in ("queries", "top", "seed")}).text_queries[0].query_id
    path = pair / "finetuned" / "t2i_predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["text_id"] != wanted))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}.*text_id={wanted}"):
        write_gallery(pair, scored["split"], tmp_path / "gallery.html", **GALLERY)
    assert not (tmp_path / "gallery.html").exists()
    with pytest.raises(DataError, match="top 11 items but the predictions rank only 10"):
        load_gallery(scored["pair"], queries=3, top=11, seed=0)


def test_every_pair_of_the_grid_gets_a_gallery_among_the_default_targets():
    from .test_pipeline import _pipeline

    pipeline = _pipeline(grid={"datasets": ["demo_cn"], "models": ["ernie_vil", "bert_clip"],
                               "pairs": ["coco_cn/chinese_clip"]})
    galleries = [t for t in pipeline.default_targets() if t.startswith("results/galleries/")]
    assert galleries == ["results/galleries/demo_cn/ernie_vil.html", "results/galleries/demo_cn/bert_clip.html",
                         "results/galleries/coco_cn/chinese_clip.html"]


# ---------------------------------------------------------------------------------------------------
# Figures: the legend covers no data point, band or tick label
# ---------------------------------------------------------------------------------------------------


def _overlaps(box, other) -> bool:
    return box.x0 < other.x1 and other.x0 < box.x1 and box.y0 < other.y1 and other.y0 < box.y1


def check_legend_covers_nothing(figure) -> None:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (legend,) = figure.legends
    box = legend.get_window_extent(renderer)
    assert figure.bbox.contains(box.x0, box.y0) and figure.bbox.contains(box.x1, box.y1), "legend cut off"
    for axis in figure.axes:
        assert not _overlaps(box, axis.get_window_extent(renderer)), "legend inside the plotting area"
        for line in axis.get_lines():
            for x, y in axis.transData.transform(line.get_xydata()):
                assert not box.contains(x, y), (line.get_label(), x, y)
        texts = [*axis.get_xticklabels(), *axis.get_yticklabels(), axis.xaxis.label, axis.yaxis.label, axis.title,
                 axis.yaxis.get_offset_text()]
        for text in texts:
            if text.get_visible() and text.get_text():
                assert not _overlaps(box, text.get_window_extent(renderer)), text.get_text()


def test_recall_figure_legend_covers_no_point_band_or_tick():
    ks = list(range(1, MAX_K + 1))
    # A stage at chance along the bottom and one near the top: every corner of the panels holds data.
    chance = {"recall": [float(k) for k in ks], "ci95_low": [0.0] * MAX_K, "ci95_high": [k + 3.0 for k in ks]}
    tuned = {"recall": [60.0 + 4 * k for k in ks], "ci95_low": [50.0 + 4 * k for k in ks], "ci95_high": [100.0] * MAX_K}
    curves = {direction: {"zeroshot": chance, "finetuned": tuned} for direction in ("text_to_image", "image_to_text")}
    figure = recall_figure(curves, title="demo / model")
    try:
        check_legend_covers_nothing(figure)
        assert [t.get_text() for t in figure.legends[0].get_texts()] == ["zeroshot", "finetuned"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)


def test_loss_figure_legend_covers_no_point_or_tick_of_either_axis():
    steps = 200
    # Warm-up to the peak learning rate at the top right of its axis, a falling loss from the top left.
    records = [{"step": s, "loss": 4.2 - 2.0 * s / steps, "lr": 5e-4 * min(1.0, s / 20) * (1 - s / (steps + 1))}
               for s in range(1, steps + 1)]
    figure = loss_figure(records, title="demo / model")
    try:
        check_legend_covers_nothing(figure)
        assert [t.get_text() for t in figure.legends[0].get_texts()] == ["loss", "learning rate"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
