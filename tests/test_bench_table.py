"""bench/table.py rebuilds the table of measured figures from the benches' JSON files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    # bench/ is a directory of scripts, not a package: load each module from its file.
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


benchjson = _load("benchjson")
table = _load("table")

PAGE = f"# Benchmarks\n\nintro\n\n{table.BEGIN_MARKER}\nold table\n{table.END_MARKER}\n\n## After\n\ntext\n"


def _figures_for_every_bench() -> dict[str, dict[str, float]]:
    figures = {bench: {headline.figure: 1.0 + index for index, headline in enumerate(headlines)}
               for bench, headlines in table.HEADLINES.items()}
    figures["bench_topk"].update(project_over_bare=1.125, project_over_faiss=0.875, project_s=6.75, bare_s=6.0)
    figures["bench_lmdb_build"]["build_over_floor"] = 1.75
    return figures


@pytest.fixture
def results(tmp_path):
    results_dir = tmp_path / "results"
    for bench, figures in _figures_for_every_bench().items():
        benchjson.write_figures(results_dir / f"{bench}.json", bench, figures,
                                command=f"python bench/{bench}.py --json out.json", threads=2)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(PAGE, encoding="utf-8")
    return results_dir, doc


def test_write_figures_keeps_figures_context_and_machine(tmp_path):
    path = tmp_path / "out" / "bench_x.json"
    benchjson.write_figures(path, "bench_x", {"a_over_b": 1.5, "a_s": 3}, texts=25_000, command="python x.py")
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["bench"] == "bench_x"
    assert document["figures"] == {"a_over_b": 1.5, "a_s": 3}
    assert document["context"] == {"texts": 25_000, "command": "python x.py"}
    assert document["machine"]["cpu_count"] >= 1 and document["machine"]["date_utc"].startswith("20")
    assert [p.name for p in path.parent.iterdir()] == ["bench_x.json"]  # no temporary left behind


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.2", None, True])
def test_write_figures_rejects_a_figure_that_is_not_a_finite_number(tmp_path, bad):
    with pytest.raises(ValueError, match="figure 'ratio' must be a finite number"):
        benchjson.write_figures(tmp_path / "x.json", "bench_x", {"ratio": bad})
    assert not (tmp_path / "x.json").exists()


def test_table_is_rendered_between_the_markers(results):
    results_dir, doc = results
    assert table.main(["--results", str(results_dir), "--doc", str(doc)]) == 0
    page = doc.read_text(encoding="utf-8")
    assert page.startswith("# Benchmarks\n\nintro\n\n" + table.BEGIN_MARKER + "\n| bench | figure |")
    assert page.endswith(table.END_MARKER + "\n\n## After\n\ntext\n")
    assert "old table" not in page
    rows = {tuple(cell.strip() for cell in line.strip("|").split(" | ")[:5]): line
            for line in page.splitlines() if line.startswith("| bench_")}
    assert ("bench_topk", "`project_over_bare`", "1.12", "<= 1.25", "yes") in rows
    assert ("bench_topk", "`project_over_faiss`", "0.88", "<= 1.00", "yes") in rows
    assert ("bench_lmdb_build", "`build_over_floor`", "1.75", "<= 1.50", "**no**") in rows
    assert ("bench_finetune", "`two_ranks_over_one`", "1.00", "", "") in rows
    row = next(line for key, line in rows.items() if key[1] == "`project_over_bare`")
    assert "`python bench/bench_topk.py --json out.json`" in row
    headline_count = sum(len(headlines) for headlines in table.HEADLINES.values())
    assert len(rows) == headline_count
    # Rebuilding from the same files leaves the page as it is.
    assert table.main(["--results", str(results_dir), "--doc", str(doc)]) == 0
    assert doc.read_text(encoding="utf-8") == page


def test_a_bench_not_listed_shows_all_its_figures(results):
    results_dir, doc = results
    benchjson.write_figures(results_dir / "bench_new.json", "bench_new", {"x_over_y": 2.5, "x_s": 1234.0})
    rendered = table.regenerate(results_dir, doc)
    assert "| bench_new | `x_over_y` | 2.50 |" in rendered and "| bench_new | `x_s` | 1,234 |" in rendered


def test_a_missing_figure_fails_naming_file_and_figure(results, capsys):
    results_dir, doc = results
    path = results_dir / "bench_topk.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    del document["figures"]["project_over_faiss"]
    path.write_text(json.dumps(document), encoding="utf-8")
    assert table.main(["--results", str(results_dir), "--doc", str(doc)]) == 1
    error = capsys.readouterr().err
    assert str(path) in error and "figure 'project_over_faiss' is missing" in error
    assert doc.read_text(encoding="utf-8") == PAGE  # the page is left as it was


def test_a_missing_bench_file_fails_unless_allowed(results, capsys):
    results_dir, doc = results
    (results_dir / "bench_finetune.json").unlink()
    assert table.main(["--results", str(results_dir), "--doc", str(doc)]) == 1
    assert "no results file for bench_finetune" in capsys.readouterr().err
    assert doc.read_text(encoding="utf-8") == PAGE
    assert table.main(["--results", str(results_dir), "--doc", str(doc), "--allow-missing"]) == 0
    assert "| bench_finetune | `two_ranks_over_one` | not measured |" in doc.read_text(encoding="utf-8")


def test_a_page_without_markers_is_an_error(results):
    results_dir, doc = results
    doc.write_text("# Benchmarks\n", encoding="utf-8")
    with pytest.raises(table.TableError, match="needs the marker lines"):
        table.regenerate(results_dir, doc)


def test_a_file_that_is_not_a_figures_document_is_named(results):
    results_dir, doc = results
    (results_dir / "stray.json").write_text(json.dumps({"images": 3}), encoding="utf-8")
    with pytest.raises(table.TableError, match=r"stray\.json: not a bench figures file"):
        table.regenerate(results_dir, doc)


def test_the_docs_page_has_the_markers():
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert page.index(table.BEGIN_MARKER) < page.index(table.END_MARKER)
