"""The pinned experiments of the article's open questions (conf/experiment/q*.yaml, scripts/experiment.py,
scripts/experiments/questions.py): specs plan the cells the issue asks for, sizes shrink them, the analyses
answer from rows, and a smoke run goes end to end on CPU."""

import json

import pytest

from harness import grid as G
from scripts import experiment as E
from scripts.experiments import questions as Q


def row(method, ratio, acc, *, task="niah_single", family=None, achieved=None, n=200, scores=None, params=None):
    fam = family or {"full": "none", "compose": "composed"}.get(method) or (
        "quantization" if method in ("kivi", "uniform_int", "fp8", "ratequant", "turboquant_kv") else "eviction")
    return {"run_id": f"{method}-{ratio}-{task}-{json.dumps(params)}", "status": "ok", "model": "tiny",
            "context_length": 4096, "task": task, "method": method, "family": fam, "ratio": ratio, "accuracy": acc,
            "n_samples": n, "ratio_achieved": achieved, "method_params": json.dumps(params or {}), "_scores": scores}


def test_every_experiment_is_listed_with_its_question(capsys):
    assert E.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("q1_lkv_generalization", "q2_overhead", "q3_production", "q4_monotone", "q5_composition"):
        assert name in out
    with pytest.raises(SystemExit, match="did you mean q4_monotone"):
        E.main(["q4_monotonee"])


def test_plan_counts_cells_and_never_runs_a_command_experiment(tmp_path, capsys):
    assert E.main(["q1_lkv_generalization", "--plan", "--results", str(tmp_path)]) == 0
    assert "runs a script of its own" in capsys.readouterr().out and not any(tmp_path.iterdir())
    assert E.main(["q5_composition", "--size", "smoke", "--plan", "--results", str(tmp_path)]) == 0
    assert "q5_composition: 4 cells, 0 done, 4 to run" in capsys.readouterr().out  # full (the gate) + 3


def test_workers_are_refused_for_a_command_experiment(tmp_path):
    with pytest.raises(SystemExit, match="--workers applies to grid experiments"):
        E.main(["q1_lkv_generalization", "--workers", "2", "--results", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_a_skipped_cell_counts_as_done_and_is_kept_on_resume(tmp_path, capsys):
    """A spec given by its path; its one cell is refused before the model loads (16384 tokens on the tiny model's
    8704): the plan counts it done, a resume keeps its row, --retry-skipped plans and reruns it."""
    import yaml

    spec = {"question": "q?", "min_full_accuracy": None, "settings": {"limit": 1, "seed": 0, "bench.enabled": False},
            "models": {"tiny": {"context_lengths": [16384], "tasks": ["niah_single"]}}, "methods": []}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = tmp_path / "res"
    assert E.main([str(path), "--results", str(res)]) == 0
    (row,) = (res / "long" / "runs").glob("*.json")
    assert json.loads(row.read_text())["status"] == "skipped"
    stamp = row.stat().st_mtime_ns
    capsys.readouterr()
    assert E.main([str(path), "--results", str(res), "--plan"]) == 0
    assert "1 cells, 1 done, 0 to run" in capsys.readouterr().out
    assert E.main([str(path), "--results", str(res), "--plan", "--retry-skipped"]) == 0
    assert "1 cells, 0 done, 1 to run" in capsys.readouterr().out
    assert E.main([str(path), "--results", str(res)]) == 0 and row.stat().st_mtime_ns == stamp
    assert E.main([str(path), "--results", str(res), "--retry-skipped"]) == 0 and row.stat().st_mtime_ns != stamp


def test_q4_plans_every_eviction_method_over_the_fine_grid():
    grid = G.load_grid(E.CONF / "q4_monotone.yaml")
    parts = G.plan(grid)
    fams = G.methods()
    evict = sorted(m for m, f in fams.items() if f == "eviction")
    cells = parts[("tiny", 4096)]["cells"]["niah_single"]
    assert sorted({c.method for c in cells}) == evict
    assert sorted({c.ratio for c in cells}) == pytest.approx([r / 100 for r in range(10, 100, 5)])
    assert grid["settings"]["limit"] >= 200
    smoke = G.load_grid(E.CONF / "q4_monotone.yaml", size="smoke")
    assert list(smoke["models"]) == ["tiny"] and smoke["settings"]["limit"] < 10  # null removes a model


def test_knob_variants_are_separate_cells_matched_by_their_params():
    grid = {"settings": {"limit": 4}, "models": {"tiny": {"context_lengths": [512], "tasks": ["niah_single"]}},
            "methods": [{"method": "snapkv", "ratios": [0.5], "knobs": {"window": 8}},
                        {"method": "snapkv", "ratios": [0.5], "knobs": {"window": 16}}]}
    cells = G.plan(grid)[("tiny", 512)]["cells"]["niah_single"]
    assert [c.variant for c in cells] == ["snapkv[window=8]", "snapkv[window=16]"]
    assert "method.window=8" in cells[0].overrides({})
    done = G.CellRows()
    r = {"run_id": "a", "model": "tiny", "context_length": 512, "task": "niah_single", "method": "snapkv",
         "ratio": 0.5, "method_params": json.dumps({"window": 16}), "status": "ok"}
    done.add(r)
    assert done.find(cells[0]) is None and done.find(cells[1]) is r


def test_monotone_finds_a_rise_beyond_noise_and_ignores_wiggles():
    rows = [row("snapkv", 0.25, 0.9), row("snapkv", 0.5, 0.5), row("snapkv", 0.75, 0.8),
            row("knorm", 0.25, 0.8), row("knorm", 0.5, 0.81), row("knorm", 0.75, 0.6),
            row("full", 0.0, 1.0)]
    a = Q.monotone(rows)
    assert a.evidence == {"curves": 2, "non_monotone": 1, "tasks": 1, "tasks_non_monotone": 1}
    assert "1 of 2" in a.answer and "0.75" in a.answer
    assert "0.5->0.75 +0.30" in a.table


def test_equal_bytes_pairs_only_within_tolerance_and_tests_paired():
    a = [1] * 150 + [0] * 50
    b = [1] * 120 + [0] * 80
    rows = [row("full", 0.0, 1.0), row("ratequant", 0.74, 0.75, achieved=0.712, scores=a),
            row("kivi", 0.75, 0.60, achieved=0.705, scores=b), row("uniform_int", 0.75, 0.7, achieved=0.69)]
    ans = Q.equal_bytes(rows, tolerance=0.01)
    assert ans.evidence == {"comparisons": 1, "wins": 1, "losses": 0, "ties": 0}
    assert "ratequant@0.74" in ans.table and "uniform_int" not in ans.table


def test_composition_compares_with_both_parts_at_equal_bytes():
    comp = row("compose", 0.875, 0.8, achieved=0.87, params={"selector": "snapkv", "quantizer": "kivi"})
    rows = [comp, row("snapkv", 0.875, 0.5, achieved=0.875), row("kivi", 0.875, 0.55, achieved=0.86),
            row("full", 0.0, 1.0)]
    ans = Q.composition(rows, tolerance=0.02)
    assert ans.evidence == {"cells": 1, "beats_both": 1} and "niah_single" in ans.answer
    assert "compose[snapkv+kivi]" in ans.table


def test_overhead_splits_each_step_against_full(tmp_path):
    (tmp_path / "rows").mkdir()
    cell = {"kind": "cell", "engine": "kvbench", "batch": 8, "context": 32768, "status": "ok", "kernel": "fused",
            "prefill_tok_s": 20000.0}
    prof = {"kind": "profile", "batch": 8, "context": 32768}
    rows = [{**cell, "label": "full", "decode_ms_p50": 17.4}, {**prof, "label": "full", "categories": {"attention": 10.0}},
            {**cell, "label": "ratequant:0.75", "decode_ms_p50": 24.0, "calibrate_ms": 584.0},
            {**prof, "label": "ratequant:0.75", "categories": {"attention": 15.0, "kv write / copy": 1.0}}]
    (tmp_path / "rows" / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = Q.overhead([], results=tmp_path)
    assert "ratequant:0.75 at 8 x 32768 at 1.38x" in a.answer
    assert "15.00 (+5.00)" in a.table and "584 (4 %)" in a.table  # 8 x 32768 tokens at 20k tok/s = 13.1 s prefill


def test_lkv_generalization_answers_from_the_studys_summary(tmp_path):
    summary = {"model": "tiny", "ratio": 0.85, "trained_at": 2048, "n": 100,
               "mean": {"seen@4096": {"full": 1.0, "lkv": 0.9, "snapkv": 0.7, "adakv": 0.8},
                        "held_out@4096": {"full": 1.0, "lkv": 0.5, "snapkv": 0.8, "adakv": 0.8}},
               "lkv_minus": {"seen@4096": {"snapkv": {"diff": 0.2, "se": 0.05}, "adakv": {"diff": 0.1, "se": 0.04}},
                             "held_out@4096": {"snapkv": {"diff": -0.3, "se": 0.05},
                                               "adakv": {"diff": -0.3, "se": 0.05}}}}
    (tmp_path / "tiny.json").write_text(json.dumps(summary))
    a = Q.lkv_generalization([], results=tmp_path)
    assert "on held_out tasks it falls below" in a.answer and "on seen tasks it never falls below" in a.answer
    assert "| seen@4096 | 2 |" in a.table


@pytest.mark.slow
def test_q4_smoke_runs_end_to_end_and_resumes(tmp_path, capsys):
    assert E.main(["q4_monotone", "--size", "smoke", "--results", str(tmp_path)]) == 0
    out = tmp_path / "q4_monotone-smoke"
    ans = json.loads((out / "answer.json").read_text())
    assert ans["rows"] == 4 and ans["evidence"]["curves"] == 1  # full (the gate) + knorm at three ratios
    assert "rise with compression" in (out / "answer.md").read_text()
    n = len(list((out / "runs").glob("*.json")))
    assert E.main(["q4_monotone", "--size", "smoke", "--results", str(tmp_path)]) == 0  # resume: nothing reruns
    assert len(list((out / "runs").glob("*.json"))) == n


@pytest.mark.slow
def test_workers_run_a_grid_experiment_and_the_parent_answers_once(tmp_path, capfd):
    """--workers 2 on a grid experiment (a spec given by its path): each worker takes its own task, the throughput
    probe runs once per method x ratio across them (harness/gpu_share.py, as the leaderboard's workers), the parent
    packs every row the workers wrote and writes the answer once, from all of them."""
    import tarfile

    import yaml

    spec = {"question": "Does accuracy rise with compression?", "analysis": "monotone", "min_full_accuracy": 0.8,
            "settings": {"limit": 2, "seed": 0, "protocol": "query_agnostic", "prefill_chunk": 64, "batch_size": 1,
                         "device": "auto", "bench.context_length": 128, "bench.decode_steps": 3},
            "models": {"tiny": {"context_lengths": [256], "tasks": ["niah_single", "niah_multikey"]}},
            "methods": [{"method": "knorm", "ratios": [0.25, 0.5]}]}
    path = tmp_path / "two_tasks.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = tmp_path / "res"
    assert E.main([str(path), "--results", str(res), "--workers", "2", "--pack", str(tmp_path / "rows.tgz")]) == 0
    cap = capfd.readouterr()
    out = res / "two_tasks"
    rows = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert {(r["task"], r["method"], r["ratio"]) for r in rows} == {
        (t, m, r) for t in ("niah_single", "niah_multikey") for m, r in (("full", 0.0), ("knorm", 0.25), ("knorm", 0.5))}
    assert all(r["status"] == "ok" for r in rows)
    assert "[grid] worker 0: niah_single" in cap.err and "[grid] worker 1: niah_multikey" in cap.err
    assert cap.err.count("throughput probe done") == 3  # full, knorm@0.25, knorm@0.5: once across the workers
    with tarfile.open(tmp_path / "rows.tgz") as tar:
        assert {n for n in tar.getnames() if n.startswith("runs/")} == {f"runs/{r['run_id']}.json" for r in rows}
    assert cap.out.count("**Answer.**") == 1  # the parent's analysis, not the workers'
    ans = json.loads((out / "answer.json").read_text())
    assert ans["rows"] == 6 and ans["evidence"]["curves"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["q1_lkv_generalization", "q2_overhead", "q3_production", "q5_composition"])
def test_every_experiment_runs_its_smoke_size(name, tmp_path):
    assert E.main([name, "--size", "smoke", "--results", str(tmp_path)]) == 0
    out = tmp_path / f"{name}-smoke"
    assert out.is_dir() and any(out.iterdir())
    ans = json.loads((out / "answer.json").read_text())  # every experiment answers, from rows or its script's output
    assert ans["answer"] and "yet" not in ans["answer"]
    if "command" not in E.specs()[name]:
        assert ans["rows"] >= 2


@pytest.mark.slow
def test_fused_divergence_reports_every_row(tmp_path, monkeypatch):
    """scripts/experiments/fused_divergence.py under the interpreter: a fused quantizer agrees with its reference to
    fp32 noise on every row, and the JSON names each row's parting step (none) and errors."""
    from scripts.experiments import fused_divergence as FD

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "d.json"
    assert FD.main(["fp8", "--ratio", "0.5", "--lengths", "24,9", "--q-len", "3", "--new", "2", "--chunk", "16",
                    "--variants", "default", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["reference"]["kernel"], report["variants"]["default"]["kernel"]) == ("reference", "fused")
    rows = report["variants"]["default"]["rows"]
    assert [r["parts_at"] for r in rows] == [None, None] and max(r["max_err"] for r in rows) < 1e-4
    assert [len(r["err_per_step"]) for r in rows] == [2, 2]
