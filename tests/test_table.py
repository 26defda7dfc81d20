"""The table (scripts/aggregate.py): which row a cell shows, and what its speed figures mean (issue 25)."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _aggregate():
    spec = importlib.util.spec_from_file_location("aggregate", REPO / "scripts" / "aggregate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(run_id, **kw):
    row = {"run_id": run_id, "model": "tiny", "model_revision": "local:abc", "weights": "trained",
           "method": "streaming_llm", "method_params": '{"n_sink": 4}', "family": "eviction", "kernel": "reference",
           "ratio": 0.5, "task": "niah_single", "protocol": "query_agnostic", "context_length": 1024,
           "prefill_chunk": 512, "batch_size": 1, "seed": 0, "n_samples": 20, "status": "ok", "accuracy": 0.9,
           "accuracy_stderr": 0.05, "ratio_achieved": 0.5, "read_ratio_achieved": 0.5, "decode_ms_p50": 9.0,
           "finished_at": "2026-12-01T00:00:00+00:00"}
    row.update(kw)
    return row


def _write(tmp_path, rows):
    runs = tmp_path / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for r in rows:
        (runs / f"{r['run_id']}.json").write_text(json.dumps(r))


def test_rows_differing_only_in_limit_or_seed_show_the_largest_n(tmp_path):
    agg = _aggregate()
    _write(tmp_path, [_row("a", n_samples=20, accuracy=0.90), _row("b", n_samples=100, accuracy=0.95, seed=1),
                      _row("c", n_samples=5, accuracy=1.0), _row("d", ratio=0.75, n_samples=10, accuracy=0.7)])
    md = agg.markdown(agg.load_rows(tmp_path))
    table, _, rest = md.partition("### superseded rows")
    assert "| n | seed |" in table
    assert "| streaming_llm | 0.5 |" in table and "0.950 ± 0.050 | 100 | 1 |" in table
    assert table.count("| streaming_llm | 0.5 |") == 1 and table.count("| streaming_llm | 0.75 |") == 1
    assert "| a |" in rest and "| c |" in rest and "| b |" not in rest  # the others, under the note
    full = agg.markdown(agg.load_rows(tmp_path), show_all=True)
    assert full.count("| streaming_llm | 0.5 |") == 3 and "superseded" not in full
    # a different knob is a different cell, not a superseded row
    _write(tmp_path, [_row("e", method_params='{"n_sink": 0}', n_samples=5)])
    md = agg.markdown(agg.load_rows(tmp_path))
    assert md.partition("### superseded rows")[0].count("| streaming_llm | 0.5 |") == 2


def test_speed_from_a_reference_path_and_a_short_read_ratio_are_footnoted(tmp_path):
    agg = _aggregate()
    _write(tmp_path, [
        _row("f", method="full", family="none", ratio=0.0, kernel="fused"),
        _row("q", method="uniform_int", family="quantization", ratio=0.75),
        _row("l", method="louver", family="sparse", ratio=0.9, read_ratio_achieved=0.17, ratio_achieved=-0.4),
    ])
    md = agg.markdown(agg.load_rows(tmp_path))
    assert "| fused |" in md
    assert "| reference [ref-quantization] |" in md and "[ref-quantization] `reference` (quantization)" in md
    assert "| reference [ref-sparse] |" in md and "not the method" in md
    assert "0.170 [read]" in md and "- [read] read achieved below the target" in md
    assert "[ref-none]" not in md  # full ran fused here: no footnote


def test_the_table_ends_with_where_rows_and_tables_are(tmp_path, capsys):
    agg = _aggregate()
    _write(tmp_path, [_row("a")])
    assert agg.main(["--results", str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[table] 1 row from") and "summary.md" in last and "samples" in last
