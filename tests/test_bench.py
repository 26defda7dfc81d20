"""scripts/bench/ (python -m scripts.bench) on CPU (--smoke): every engine measures every cell, rows merge across calls."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # end to end (make test-slow; CI runs it): keeps make test under 5 minutes
def test_bench_smoke_measures_every_engine_and_merges_calls(tmp_path):
    """The first call in a fresh interpreter: the benchmark (every module of scripts/bench/ and what they import
    while measuring) runs on the GPU machine, so it imports neither lm-eval, wandb nor Hydra."""
    import subprocess
    import sys

    from scripts.bench import cli
    from scripts.bench.common import ENGINES

    code = (f"import sys; from scripts.bench import cli; assert cli.main(['--smoke', '--out-dir', {str(tmp_path)!r}]) == 0; "
            "bad = {'lm_eval', 'wandb', 'hydra'} & set(sys.modules); assert not bad, sorted(bad)")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert cli.main(["--smoke", "--out-dir", str(tmp_path), "--engines", "kvbench"]) == 0  # a second call
    rows_file = next((tmp_path / "rows").glob("cpu-smoke-*.jsonl"))
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    cells = [r for r in rows if r["kind"] == "cell"]
    assert len(cells) == 2 * 3 + 2 and all(r["status"] == "ok" for r in cells)
    assert {r["engine"] for r in cells} == set(ENGINES)
    assert all(r["decode_ms_p50"] > 0 and r["decode_steps"] == 4 for r in cells)
    assert len([r for r in rows if r["kind"] == "command"]) == 2
    report = next(tmp_path.glob("cpu-smoke-*.md")).read_text()
    for engine in ENGINES:  # the merged report: the latest row per engine and cell, both commands
        assert report.count(f"| {engine} |") == 2
    assert report.count("python -m scripts.bench --smoke") == 2


def test_bench_accounting():
    from harness.models import build_random_model, tiny_config
    from scripts.bench import common as bench

    model = build_random_model(tiny_config("llama", n_layers=2, vocab_size=256), seed=0)
    cfg = model.config
    assert bench.kv_bytes_per_token(cfg) == 2 * 2 * 2 * 32 * 2  # K and V x layers x kv heads x head_dim x bf16
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert bench.weight_bytes_read(model) == total - emb.numel() * emb.element_size()  # untied: table not read
    assert bench.parse_cells("1x8192,8x32768") == [(1, 8192), (8, 32768)]


def test_bench_profile_breaks_a_decode_step_down(tmp_path):
    """--profile: per cell, the profiled steps' time by category (on CPU the aten ops' self time, where the
    tiny Llama's matmuls must show up as gemm); busy is the categories' sum and the top list is sorted."""
    from scripts.bench import cli

    assert cli.main(["--smoke", "--out-dir", str(tmp_path), "--engines", "kvbench", "--profile", "3"]) == 0
    rows = [json.loads(x) for x in next((tmp_path / "rows").glob("cpu-smoke-*.jsonl")).read_text().splitlines()]
    profs = [r for r in rows if r["kind"] == "profile"]
    assert [(r["batch"], r["context"]) for r in profs] == [(1, 64), (2, 48)]
    for r in profs:
        assert "error" not in r, r.get("error")
        assert r["steps"] == 3 and r["categories"]["gemm"] > 0
        assert abs(r["busy_ms"] - sum(r["categories"].values())) < 1e-9 and r["step_ms_p50"] > 0
        assert [ms for _, ms, _ in r["top"]] == sorted((ms for _, ms, _ in r["top"]), reverse=True)
        assert any("mm" in name or "linear" in name for name, _, _ in r["top"])
    report = next(tmp_path.glob("cpu-smoke-*.md")).read_text()
    assert "Where a kvbench `full` decode step goes" in report and "| attention | gemm |" in report


def test_report_checks_the_targets_and_names_every_commit():
    """The report's targets section: roofline bar per target cell (met / missed / not measured), the speed-up
    over HF StaticCache + compile where that engine is below 0.27 of roofline, peak memory against weights +
    KV capacity + 2 GB; rows of another commit are named in the header."""
    from scripts.bench import report as bench

    def cell(engine, B, S, frac, tok_s, peak=None, commit="abc"):
        return {"kind": "cell", "engine": engine, "batch": B, "context": S, "status": "ok", "roofline_frac": frac,
                "tokens_s": tok_s, "decode_steps": 9, "peak_mem_prefill_bytes": peak, "commit": commit}

    kv_tok = 1000
    rows = [cell("kvbench", 1, 32768, 0.81, 100, peak=2.5e9), cell("kvbench", 8, 32768, 0.79, 600, peak=30e9),
            cell("hf_static_compile", 8, 32768, 0.14, 100, commit="def")]
    meta = {"kv_bytes_per_token": kv_tok, "weight_bytes": 1e9}
    text = "\n".join(bench.targets(rows, meta))
    assert "roofline_frac >= 0.80 at 1 x 32768: 0.81 met" in text
    assert "roofline_frac >= 0.80 at 8 x 32768: 0.79 missed" in text
    assert "at 1 x 131072: not measured" in text
    assert "(HF at 0.14 of roofline: the target applies): 6.00x met" in text
    cap = 1 * (32768 + 9 + 1) * kv_tok  # context + decode steps + the first token's slot
    assert f"KV capacity {cap / 1e9:.2f} + 2 GB = {(1e9 + cap + 2e9) / 1e9:.2f} GB: met" in text
    assert "peak memory at 8 x 32768: 30.00 GB" in text and text.rstrip().endswith("missed")
    assert bench.row_commits(rows, "abc") == " (hf_static_compile rows measured at def)"
