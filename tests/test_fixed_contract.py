"""scripts/experiments/fixed_contract.py --smoke: the whole diagnostic on the tiny model, on CPU, in seconds."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_writes_csv_markdown_and_a_json_last_line(tmp_path):
    code = ("import sys; import scripts.experiments.fixed_contract as fc; "
            "assert not {'lm_eval', 'wandb', 'hydra'} & set(sys.modules), 'GPU scripts import none of these'; "
            f"fc.main(['--smoke', '--out', {str(tmp_path)!r}, '--ratios', '0.5,0.75']); "
            "assert not {'lm_eval', 'wandb', 'hydra'} & set(sys.modules), sorted(set(sys.modules) & {'lm_eval', 'wandb', 'hydra'})")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["cells"] == 2 and summary["grid"]["tasks"] == ["niah_single"]
    assert set(summary["shares"]) == {"ranking=value_aware", "ranking=vatp", "projection=topk", "projection=dilate",
                                      "support=decode_queries", "all probes"}
    for s in summary["shares"].values():
        assert s["positive_margin"]["cells"] + s["non_positive_margin"]["cells"] in (2, 10)
    rows = list(csv.DictReader(open(tmp_path / "smoke.csv")))
    assert len(rows) == 2 * 7  # per budget: full, base and five probes
    for r in rows:
        assert 0.0 <= float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"]) <= 1.0
        if r["selector"] != "full":
            assert abs(float(r["ratio_achieved"]) - float(r["ratio"])) < 0.06, r
    md = (tmp_path / "smoke.md").read_text()
    assert "| probe | helps, positive-margin cells |" in md and md in out.stdout
    # a rerun resumes from the cache: no sample is evaluated again
    again = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "acc " not in again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary
