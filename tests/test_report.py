"""The report page (scripts/report.py): self-contained, every method and model present, plots embedded."""

import json
import math
import re
from pathlib import Path

import pytest

from harness.grid import methods
from scripts import report as rep
from scripts.experiments import questions as Q
from scripts.leaderboard import load_grid
from tests.report_rows import write_rows

REPO = Path(__file__).resolve().parent.parent


def test_wilson_and_pareto():
    lo, hi = rep.wilson(1.0, 100)
    assert math.isclose(hi, 1.0) and 0.96 < lo < 0.97  # 1.0 over 100 samples is not [1, 1]
    lo, hi = rep.wilson(0.5, 100)
    assert math.isclose(0.5 - lo, hi - 0.5, rel_tol=1e-9) and 0.09 < hi - 0.5 < 0.1
    pts = [(1, 1.0), (2, 0.9), (2, 0.5), (4, 0.95), (8, 0.2), (0.5, 0.99)]
    assert rep.pareto_front(pts) == [0, 3, 4]
    assert math.isclose(rep.compression(0.75), 4.0) and rep.compression(-0.25) == 0.8


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    grid = load_grid()
    write_rows(tmp / "res", grid)
    exp = tmp / "exp" / "q4_monotone"  # one answered open question (hand-made rows), the other four not yet
    (exp / "runs").mkdir(parents=True)
    rows = [{"run_id": f"r{i}", "status": "ok", "model": "tiny", "context_length": 4096, "task": "niah_single",
             "method": "snapkv", "family": "eviction", "ratio": r, "accuracy": a, "n_samples": 200}
            for i, (r, a) in enumerate([(0.25, 0.9), (0.5, 0.5), (0.75, 0.8)])]
    for r in rows:
        (exp / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))
    ans = Q.monotone(rows)
    (exp / "answer.md").write_text(ans.markdown())
    (exp / "answer.json").write_text(json.dumps({"answer": ans.answer, "rows": len(rows)}))
    out = rep.build(results=tmp / "res", bench_dir=REPO / "results" / "bench", out=tmp / "index.html",
                    grid_path=REPO / "conf" / "experiment" / "leaderboard.yaml", experiments=tmp / "exp")
    return out.read_text()


def test_each_open_question_has_its_section(page):
    for name in ("q1_lkv_generalization", "q2_overhead", "q3_production", "q4_monotone", "q5_composition"):
        assert f'id="q-{name}"' in page, name
    assert "1 of 1 task x eviction-method accuracy curves rise with compression" in page  # q4's answer
    assert "0.5-&gt;0.75 +0.30" in page  # its table
    assert "against the ratio" in page  # its plot
    assert page.count("Not answered yet") == 4 and "make experiment NAME=q5_composition" in page


def test_engine_benchmark_names_each_method_and_its_multiple_of_full(page):
    """The committed bench rows (results/bench/rows): one line per method and ratio, with decode ms over full's
    in the same call (a table of bare "kvbench" lines could not be read)."""
    bench = page[page.index('id="bench"'):]
    for col in ("<th>method</th>", "<th>ratio</th>", "<th>x full (same call)</th>", "<th>KV GB read / step</th>"):
        assert col in bench, col
    assert re.search(r"<td>full</td><td>0</td>.*?<td>1\.00</td>", bench)


def test_every_method_and_model_is_on_the_page(page):
    for m in methods():
        assert f"<td>{m}</td>" in page, m
    for model in load_grid()["models"]:
        assert f'id="{model}-' in page, model
    assert "skipped" in page and "no LKV weights" in page  # a skipped cell says why


def test_page_is_self_contained(page):
    import plotly.offline as po

    assert len(page.encode()) < 10 * 2**20
    # plotly.js inlined once (its bundle names map-tile servers and plotly.com for features we never draw:
    # scatter plots only, no logo; report-check renders the page with every request refused)
    js = po.get_plotlyjs()
    assert page.count(js) == 1
    ours = page.replace(js, "")
    # nothing of ours is fetched: no external scripts, styles, images, fonts or frames
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', ours, re.I)
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", ours, re.I) and "@import" not in ours
    assert '"displaylogo": false' in ours
    n_plots = page.count("Plotly.newPlot(")
    assert n_plots >= 4 * 2  # two models with rows: 4 plots each (compression, speed, read, family)
    assert page.count('class="plot"') == n_plots


def test_plots_show_frontier_reference_and_intervals(page):
    for s in ("Pareto frontier", "full-cache accuracy", "full-cache decode speed", "95% CI", "mean over tasks"):
        assert s in page, s
    # speeds from the reference stores say so beside the number
    assert "reference (CPU) speed" in page
    # how it was measured
    for s in ("How every number was measured", "query_agnostic", "Wilson", "abcdef12"):
        assert s in page, s


def test_committed_report_rebuilds(tmp_path):
    """make report on the committed rows (when there are any): same checks, built into a temp file."""
    res = REPO / "results" / "leaderboard"
    if not any((res / "runs").glob("*.json")):
        pytest.skip("no committed leaderboard rows")
    out = rep.build(results=res, bench_dir=REPO / "results" / "bench", out=tmp_path / "index.html",
                    grid_path=REPO / "conf" / "experiment" / "leaderboard.yaml")
    text = out.read_text()
    for m in methods():
        assert f"<td>{m}</td>" in text, m
    assert "Plotly.newPlot(" in text
