"""scripts/bench.py on CPU (--smoke): every engine measures every cell, rows merge across calls."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def test_bench_smoke_measures_every_engine_and_merges_calls(tmp_path):
    import bench

    assert bench.main(["--smoke", "--out-dir", str(tmp_path)]) == 0
    assert bench.main(["--smoke", "--out-dir", str(tmp_path), "--engines", "kvbench"]) == 0  # a second call
    rows_file = next((tmp_path / "rows").glob("cpu-smoke-*.jsonl"))
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()]
    cells = [r for r in rows if r["kind"] == "cell"]
    assert len(cells) == 2 * 3 + 2 and all(r["status"] == "ok" for r in cells)
    assert {r["engine"] for r in cells} == set(bench.ENGINES)
    assert all(r["decode_ms_p50"] > 0 and r["decode_steps"] == 4 for r in cells)
    assert len([r for r in rows if r["kind"] == "command"]) == 2
    report = next(tmp_path.glob("cpu-smoke-*.md")).read_text()
    for engine in bench.ENGINES:  # the merged report: the latest row per engine and cell, both commands
        assert report.count(f"| {engine} |") == 2
    assert report.count("python scripts/bench.py --smoke") == 2


def test_bench_accounting():
    import bench

    from harness.models import build_random_model, tiny_config

    model = build_random_model(tiny_config("llama", n_layers=2, vocab_size=256), seed=0)
    cfg = model.config
    assert bench.kv_bytes_per_token(cfg) == 2 * 2 * 2 * 32 * 2  # K and V x layers x kv heads x head_dim x bf16
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert bench.weight_bytes_read(model) == total - emb.numel() * emb.element_size()  # untied: table not read
    assert bench.parse_cells("1x8192,8x32768") == [(1, 8192), (8, 32768)]
