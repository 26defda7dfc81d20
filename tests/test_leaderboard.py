"""The leaderboard grid and its runner (scripts/leaderboard.py): every method has cells, rows are ordinary
harness.run rows (same run_id), the gate drops tasks the model cannot do, resume, one probe per method x ratio."""

import json
import re
import tarfile
from pathlib import Path

import pytest
import yaml

from harness import grid as G
from harness.run import options, run_job
from harness.sweep import compose
from scripts import leaderboard as L

REPO = Path(__file__).resolve().parent.parent


def test_pinned_grid_covers_every_method_on_both_models():
    grid = L.load_grid()
    assert {"tiny", "smollm2_135m"} <= set(grid["models"])
    assert grid["settings"]["limit"] >= 100 and grid["min_full_accuracy"] == 0.8
    assert grid["models"]["tiny"]["context_lengths"] == [4096, 8192]
    parts = G.plan(grid)
    ratios = G.family_ratios()
    fams = G.methods()
    assert set(fams) == set(options("method"))
    for (model, length), part in parts.items():
        seen = {(c.method, c.ratio) for cells in part["cells"].values() for c in cells} | {
            (c.method, c.ratio) for c in part["gate"]}
        for method, fam in fams.items():  # every method at each of its family's ratios
            assert {(method, r) for r in ratios[fam]} <= seen, (model, length, method)
    # run order per task: every method once (at its ratio nearest 4x) before any method's second ratio
    first = part["cells"][grid["models"][model]["tasks"][0]]
    n = len([m for m in fams if m != "full"])
    assert len({c.method for c in first[:n]}) == n
    assert {c.ratio for c in first[:n] if c.family in ("quantization", "eviction", "sparse")} == {0.75}
    # the per-family ratios are the sweep files' (one source)
    q = yaml.safe_load((REPO / "conf/sweep/quantization.yaml").read_text())["hydra"]["sweeper"]["params"]["ratio"]
    assert ratios["quantization"] == [float(x) for x in str(q).split(",")]


def _grid(tmp_path):
    grid = {"min_full_accuracy": 0.8,
            "settings": {"limit": 2, "seed": 0, "protocol": "query_agnostic", "prefill_chunk": 64, "batch_size": 1,
                         "device": "auto", "bench.context_length": 128, "bench.decode_steps": 3},
            "models": {"tiny": {"context_lengths": [256], "tasks": ["niah_single", "common_words", "niah_multikey"]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_runner_rows_gate_resume_and_shared_probe(tmp_path, capsys):
    grid_path = _grid(tmp_path)
    res = tmp_path / "res"
    args = ["--grid", str(grid_path), "--results", str(res), "--methods", "streaming_llm", "--pack", str(tmp_path / "rows.tgz")]
    assert L.main(args) == 0
    rows = {r["run_id"]: r for r in map(lambda p: json.loads(p.read_text()), (res / "runs").glob("*.json"))}
    by = {(r["task"], r["method"], r["ratio"]): r for r in rows.values()}
    # the gate: common_words is out (the tiny model never learned it), so only full ran there
    assert by[("common_words", "full", 0.0)]["accuracy"] < 0.8
    assert not [k for k in by if k[0] == "common_words" and k[1] != "full"]
    eviction = G.family_ratios()["eviction"]
    for task in ("niah_single", "niah_multikey"):
        assert by[(task, "full", 0.0)]["accuracy"] >= 0.8
        assert {r for (t, m, r) in by if t == task and m == "streaming_llm"} == set(eviction)
    # a cell's row is the ordinary harness.run row: same run_id as a direct run of the same overrides
    cell = by[("niah_single", "streaming_llm", 0.5)]
    cfg = compose(["model=tiny", "method=streaming_llm", "ratio=0.5", "task=niah_single", "context_length=256",
                   "limit=2", "seed=0", "protocol=query_agnostic", "prefill_chunk=64", "batch_size=1", "device=auto",
                   "bench.context_length=128", "bench.decode_steps=3", f"results_dir={res}", "progress=false"])
    again = run_job(cfg, method_name="streaming_llm")
    assert again["run_id"] == cell["run_id"] and again["finished_at"] == cell["finished_at"]  # found done, not rerun
    # the probe ran once per method x ratio: the second task's row carries the first one's speed columns
    other = by[("niah_multikey", "streaming_llm", 0.5)]
    for col in ("decode_tok_s", "decode_ms_p50", "prefill_tok_s", "peak_mem_decode_bytes"):
        assert other[col] == cell[col] and cell[col] is not None
    # resume: nothing left to run
    assert L.main(["--grid", str(grid_path), "--results", str(res), "--methods", "streaming_llm"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["written"] == 0
    # the pack holds exactly the rows written by the first invocation
    with tarfile.open(tmp_path / "rows.tgz") as tar:
        names = {n for n in tar.getnames() if n.startswith("runs/")}
    assert names == {f"runs/{rid}.json" for rid in rows}
    # tables: the status page and the aggregate
    text = (res / "README.md").read_text()
    assert re.search(r"common_words 0\.\d\d ✗", text) and "niah_single 1.00 ✓" in text
    assert (res / "summary.md").is_file()
    assert "tiny @ 256" in L.estimate(L.load_grid(grid_path), G.plan(L.load_grid(grid_path)), G.read_rows(res))


@pytest.mark.slow
def test_workers_share_the_gpu_and_the_probes(tmp_path, capfd):
    """--workers 2: each worker takes its own tasks (gate and cells together), the rows are the ordinary ones, each
    method x ratio is probed once across the workers (harness/gpu_share.py), and the parent packs and tabulates."""
    grid_path = _grid(tmp_path)
    res = tmp_path / "res"
    assert L.main(["--grid", str(grid_path), "--results", str(res), "--methods", "streaming_llm", "--workers", "2",
                   "--pack", str(tmp_path / "rows.tgz")]) == 0
    err = capfd.readouterr().err
    rows = [json.loads(p.read_text()) for p in (res / "runs").glob("*.json")]
    got = {(r["task"], r["method"], r["ratio"]) for r in rows}
    eviction = G.family_ratios()["eviction"]
    assert got == ({(t, "full", 0.0) for t in ("niah_single", "common_words", "niah_multikey")}
                   | {(t, "streaming_llm", r) for t in ("niah_single", "niah_multikey") for r in eviction})
    assert all(r["status"] == "ok" for r in rows)
    assert "[grid] worker 0: niah_single niah_multikey" in err and "[grid] worker 1: common_words" in err
    assert err.count("throughput probe done") == 1 + len(eviction)  # one probe per method x ratio, all workers
    with tarfile.open(tmp_path / "rows.tgz") as tar:
        assert {n for n in tar.getnames() if n.startswith("runs/")} == {f"runs/{r['run_id']}.json" for r in rows}
    assert "niah_single 1.00 ✓" in (res / "README.md").read_text()


def test_resume_keeps_skipped_rows_and_retries_failed_ones(tmp_path, monkeypatch, capsys):
    """A cell whose skipped row exists (same run_id) is not rerun on resume and its row file is left as written;
    a failed cell reruns; --retry-skipped reruns the skipped ones. CPU, no model load: at 16384 tokens every cell is
    refused before loading (the tiny model holds 8704), and the runs at 256 break (a stand-in for a broken run)."""
    import harness.run as HR

    def broken(*a, **k):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(HR, "_run", broken)
    grid = {"min_full_accuracy": None, "settings": {"limit": 1, "seed": 0, "device": "cpu", "bench.enabled": False},
            "models": {"tiny": {"context_lengths": [16384, 256], "tasks": ["niah_single"]}},
            "methods": []}  # full only: the gate cell at each length
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    res = tmp_path / "res"

    def run(*more):
        out = tmp_path / "written.json"
        assert L.main(["--grid", str(path), "--results", str(res), "--no-tables", "--written-to", str(out), *more]) == 0
        return set(json.loads(out.read_text()))

    first = run()
    rows = {p.stem: json.loads(p.read_text()) for p in (res / "runs").glob("*.json")}
    assert first == set(rows) and len(rows) == 2
    skipped = {rid for rid, r in rows.items() if r["status"] == "skipped"}
    failed = {rid for rid, r in rows.items() if r["status"] == "failed"}
    assert [rows[r]["context_length"] for r in skipped] == [16384] and len(failed) == 1
    assert all("does not fit" in rows[r]["reason"] for r in skipped)
    before = {rid: ((res / "runs" / f"{rid}.json").read_bytes(), (res / "runs" / f"{rid}.json").stat().st_mtime_ns)
              for rid in skipped}
    capsys.readouterr()
    assert run() == failed  # resume: only the failed cell reruns
    assert "1 skipped cell kept" in capsys.readouterr().err
    assert {rid: ((res / "runs" / f"{rid}.json").read_bytes(), (res / "runs" / f"{rid}.json").stat().st_mtime_ns)
            for rid in skipped} == before  # not rewritten
    history = res / "runs" / "history"
    assert not [p for rid in skipped for p in history.glob(f"{rid}.*")]  # nor moved to history/
    assert len([p for rid in failed for p in history.glob(f"{rid}.*")]) == 1  # the failed one's first row is there
    assert run("--retry-skipped") == skipped | failed
    assert all(json.loads((res / "runs" / f"{rid}.json").read_text())["status"] == "skipped" for rid in skipped)
    assert [p.read_bytes() for rid in skipped for p in history.glob(f"{rid}.*")] == [
        text for text, _ in before.values()]  # the row it replaced is kept in history/
    # a skipped row of the same cell and settings but another config (a setting the grid leaves free, prefill_chunk)
    # is not this cell's row: the cell runs
    for rid, (text, _) in before.items():
        (res / "runs" / f"{rid}.json").unlink()
        row = json.loads(text)
        config = json.loads(row["config"])
        config["prefill_chunk"] += 1
        row.update(run_id=f"other-{rid}", config=json.dumps(config, sort_keys=True), finished_at="9999")
        (res / "runs" / f"other-{rid}.json").write_text(json.dumps(row))
    assert G.rows_by_cell(G.read_rows(res), grid["settings"]).find(G.plan(grid)[("tiny", 16384)]["gate"][0])[
        "run_id"].startswith("other-")  # what the tables see for the cell
    assert run() == skipped | failed


def test_a_skip_that_trained_weights_lift_is_retried():
    """LKV (and a composition with it) skips a model it has no weights for under the run_id it will have once they
    are trained, so its skipped row is retried on resume; every other skip is fixed by the run_id."""
    cell = lambda m, r=0.5, knobs=(): G.Cell("tiny", 4096, "niah_single", m, "eviction", r, knobs)  # noqa: E731
    assert G.reads_weights(cell("lkv"))
    assert not G.reads_weights(cell("lkv", knobs=(("allocation", "uniform"), ("scorer", "uniform"))))
    assert G.reads_weights(cell("compose", 0.875, (("selector", "lkv"),)))
    assert not G.reads_weights(cell("compose", 0.875, (("selector", "snapkv"),)))
    assert not G.reads_weights(cell("snapkv")) and not G.reads_weights(cell("no_such_method"))
    # plans and estimates count such a cell as still to run, as the resume does
    skipped, ok = {"status": "skipped"}, {"status": "ok"}
    assert not G.settled(skipped, cell("lkv")) and G.settled(ok, cell("lkv"))
    assert G.settled(skipped, cell("snapkv")) and not G.settled(None, cell("snapkv")) and not G.settled({"status": "failed"})


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit, match="unknown method"):
        G.plan(L.load_grid(), only_methods=["snapkvv"])


def test_wandb_sync_carries_the_grouping_keys(tmp_path, monkeypatch):
    """--wandb logs each grid row as an offline W&B run whose config has the flat grouping keys."""
    import glob
    import time

    from harness.wandb_logger import GROUPING_KEYS
    from tests.helpers import read_wandb_offline
    from tests.report_rows import write_rows

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    grid = {"min_full_accuracy": 0.8, "settings": L.load_grid()["settings"],
            "models": {"tiny": {"context_lengths": [4096], "tasks": ["niah_single"]}}}
    res = tmp_path / "res"
    rows = write_rows(res, grid, tasks=("niah_single",))
    keep = {r["run_id"] for r in rows if r["method"] == "full"}
    for p in (res / "runs").glob("*.json"):  # one row is enough
        if p.stem not in keep:
            p.unlink()
    assert L.sync_wandb(grid, res, project="kvbench-test", group="leaderboard") == 1
    files = glob.glob(str(res / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    config: set = set()
    for _ in range(120):  # the W&B service writes asynchronously
        try:
            summary, config, _ = read_wandb_offline(files[0])
        except AssertionError:
            summary = {}
        if "run_id" in summary:
            break
        time.sleep(0.5)
    assert set(GROUPING_KEYS) <= config and summary["method"] == "full"
