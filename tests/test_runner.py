"""The runner: rows, skip-if-done, skipped/failed rows, CLI errors, tables, W&B, launchers."""

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import results as R
from harness.run import run_job
from harness.sweep import compose
from tests.helpers import read_wandb_offline

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "WANDB_SILENT": "true"}
SMALL = ["limit=3", "context_length=256", "prefill_chunk=64", "bench.context_length=128", "bench.decode_steps=4",
         "progress=false"]


def cli(*args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, "-m", "harness.run", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def job(tmp_path, *overrides, method=None):
    cfg = compose([*SMALL, f"results_dir={tmp_path}", *overrides])
    name = method or next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")), "full")
    return run_job(cfg, method_name=name)


@pytest.mark.slow
def test_cli_row_has_every_column_and_rerun_is_skipped(tmp_path):
    args = ["method=streaming_llm", "ratio=0.5", "task=niah_single", *SMALL, f"results_dir={tmp_path}"]
    p = cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(R.COLUMNS) <= set(row)
    assert row["status"] == "ok" and row["n_samples"] == 3 and row["weights"] in ("random", "trained")
    for col in ("prefill_tok_s", "ttft_ms", "decode_tok_s", "decode_ms_p50", "decode_ms_p90",
                "peak_mem_prefill_bytes", "peak_mem_decode_bytes", "kv_bytes_full", "kv_bytes_stored", "weights_bytes"):
        assert row[col] is not None and row[col] > 0, col
    assert 0.45 < row["ratio_achieved"] < 0.55
    # decode tok/s (batch / mean step) agrees with batch x 1000 / median step ms: same units, and within a
    # factor of 2 (the mean and the median part when a loaded machine stalls a few steps)
    ratio = row["decode_tok_s"] / (1000 * row["probe_batch_size"] / row["decode_ms_p50"])
    assert 0.5 < ratio < 2.0, ratio
    path = R.row_path(tmp_path, row["run_id"])
    before = (path.stat().st_mtime_ns, path.read_bytes())
    p2 = cli(*args)
    assert p2.returncode == 0
    assert "skipped" in p2.stderr and "force=true" in p2.stderr
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert json.loads(p2.stdout.strip().splitlines()[-1])["run_id"] == row["run_id"]


def test_retrained_weights_at_the_same_path_are_a_new_run(tmp_path):
    """Rows are keyed by the weights, not only the path: swapping the checkpoint under models/x must not
    return the old checkpoint's rows as "already done"."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(REPO / "models" / "kvbench-tiny", model)
    over = [f"model.path={model}", "method=full", "task=niah_single", "bench.enabled=false"]
    first = job(tmp_path, *over)
    assert first["status"] == "ok" and first["model_revision"].startswith("local:")
    assert first["model"] == "model"  # named after the directory loaded, not the config's "tiny"
    assert job(tmp_path, *over)["started_at"] == first["started_at"]  # same weights: skipped as done
    from safetensors.torch import load_file, save_file

    w = load_file(model / "model.safetensors")
    w = {k: v * 1.01 if k.endswith("norm.weight") else v for k, v in w.items()}
    save_file(w, model / "model.safetensors", metadata={"format": "pt"})
    second = job(tmp_path, *over)
    assert second["run_id"] != first["run_id"] and second["model_revision"] != first["model_revision"]
    assert R.row_path(tmp_path, first["run_id"]).is_file()  # the old row is kept
    from harness.loading import model_revision

    assert model_revision({"path": str(model), "revision": "v1"}) == "v1"  # a pinned revision is the identity
    assert model_revision({"path": "org/not-a-local-dir"}) is None


def test_unknown_options_exit_2_with_the_names():
    p = cli("method=streaming_lm")
    assert p.returncode == 2
    assert "did you mean streaming_llm?" in p.stderr and "uniform_int" in p.stderr
    p = cli("task=niah_singel")
    assert p.returncode == 2 and "did you mean niah_single?" in p.stderr
    p = cli("ratoi=0.5")
    assert p.returncode == 2 and "did you mean ratio?" in p.stderr


def test_ratio_a_method_cannot_honour_gives_a_skipped_row(tmp_path):
    row = job(tmp_path, "method=uniform_int", "ratio=0.8125")
    assert row["status"] == "skipped" and "3 bits" in row["reason"]
    assert R.read_row(R.row_path(tmp_path, row["run_id"]))["status"] == "skipped"


def test_failed_run_writes_its_row_and_nothing_is_lost(tmp_path):
    row = job(tmp_path, "method=uniform_int", "ratio=0.75", "method.group_size=0")
    assert row["status"] == "failed" and "group_size" in row["reason"]
    row2 = job(tmp_path, "method=uniform_int", "ratio=0.75", "method.group_size=0")  # not ok: rerun
    assert row2["run_id"] == row["run_id"]
    history = list((tmp_path / "runs" / "history").glob(f"{row['run_id']}.*.json"))
    assert len(history) == 1 and json.loads(history[0].read_text())["started_at"] == row["started_at"]


def test_force_reruns_and_keeps_the_previous_row(tmp_path):
    a = job(tmp_path, "method=full", "bench.enabled=false")
    b = job(tmp_path, "method=full", "bench.enabled=false")
    assert b["started_at"] == a["started_at"]  # skipped: the same row
    c = job(tmp_path, "method=full", "bench.enabled=false", "force=true")
    assert c["run_id"] == a["run_id"]  # force is not part of the identity
    assert len(list((tmp_path / "runs" / "history").glob("*.json"))) == 1


@pytest.mark.slow
def test_probe_batch_follows_batch_size_unless_bench_sets_it(tmp_path):
    cache: dict = {}  # a probe measured at one batch is never copied into a row of another batch
    fast = ["method=full", "limit=1", "context_length=128", "bench.context_length=64", "bench.decode_steps=2"]
    for batch in (2, 1):
        cfg = compose([*SMALL, f"results_dir={tmp_path}", *fast, f"batch_size={batch}"])
        row = run_job(cfg, method_name="full", probe_cache=cache)
        assert row["status"] == "ok", row["reason"]
        assert row["probe_batch_size"] == batch and row["probe_batch_from"] == "batch_size"
    assert len(cache) == 2
    row = job(tmp_path, *fast, "batch_size=2", "bench.batch_size=1")
    assert row["probe_batch_size"] == 1 and row["probe_batch_from"] == "bench.batch_size"


def test_query_aware_fallback_is_recorded(tmp_path):
    row = job(tmp_path, "method=full", "bench.enabled=false", "task.context_field=null")
    assert row["status"] == "ok" and row["protocol"] == "query_aware" and "context_field" in row["reason"]


def test_perplexity_task_and_user_file(tmp_path):
    text = tmp_path / "my.txt"
    text.write_text(" ".join(f"word{i % 97} and more text number {i}." for i in range(3000)))
    row = job(tmp_path, "method=full", "task=ppl", f"task.file={text}", "ppl_chunk=64", "bench.enabled=false")
    assert row["status"] == "ok", row["reason"]
    assert row["accuracy"] > 1 and "m.bits_per_byte" in row  # word perplexity of a random model is large
    missing = job(tmp_path, "method=full", "task=ppl", "task.file=/nonexistent.txt", "bench.enabled=false")
    assert missing["status"] == "failed" and "nonexistent" in missing["reason"]


def test_table_from_rows(tmp_path):
    job(tmp_path, "method=full", "bench.enabled=false")
    job(tmp_path, "method=streaming_llm", "ratio=0.75", "bench.enabled=false")
    job(tmp_path, "method=uniform_int", "ratio=0.8125")  # skipped
    p = subprocess.run([sys.executable, "-m", "scripts.aggregate", "--results", str(tmp_path)], cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import pandas as pd

    df = pd.read_csv(tmp_path / "summary.csv")
    assert len(df) == 3 and df["run_id"].is_unique
    pq = pd.read_parquet(tmp_path / "summary.parquet")
    assert len(pq) == 3
    md = (tmp_path / "summary.md").read_text()
    assert md.index("| full |") < md.index("| streaming_llm |")
    assert "skipped and failed runs" in md and "3 bits" in md
    assert "| read achieved |" in md
    # a row of other weights under the same model name goes to its own table, named by its revision
    row = next(r for r in (json.loads(p.read_text()) for p in tmp_path.glob("runs/*.json")) if r["status"] == "ok")
    rev = row["model_revision"]
    row.update(run_id="0" * 16, model_revision="local:other")
    (tmp_path / "runs" / f"{row['run_id']}.json").write_text(json.dumps(row))
    subprocess.run([sys.executable, "-m", "scripts.aggregate", "--results", str(tmp_path), "--quiet"], cwd=REPO, env=ENV,
                   check=True)
    md = (tmp_path / "summary.md").read_text()
    assert f"@ {rev} ·" in md and "@ local:other ·" in md


def test_wandb_offline_run_holds_the_row(tmp_path, capsys):
    row = job(tmp_path, "method=full", "logger=wandb", f"logger.dir={tmp_path}/wb", "bench.enabled=false")
    files = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    # the same run again is skipped: nothing is sent, and the message says how to send it
    capsys.readouterr()
    job(tmp_path, "method=full", "logger=wandb", f"logger.dir={tmp_path}/wb", "bench.enabled=false")
    assert "logger.resync=true sends the existing row" in capsys.readouterr().err
    assert len(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))) == 1
    again = job(tmp_path, "method=full", "logger=wandb", f"logger.dir={tmp_path}/wb", "bench.enabled=false",
                "logger.resync=true")
    assert again["started_at"] == row["started_at"]  # not rerun
    assert len(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))) == 2
    # the W&B service writes the file asynchronously; on a loaded machine the summary can land after the
    # run has returned, so wait for it (up to a minute) before reading
    summary: dict = {}
    for _ in range(120):
        try:
            summary, config, kinds = read_wandb_offline(files[0])
        except AssertionError:  # header not written yet
            summary = {}
        if "run_id" in summary:
            break
        time.sleep(0.5)
    assert summary["run_id"] == row["run_id"] and summary["accuracy"] == row["accuracy"]
    assert summary["kv_bytes_stored"] == row["kv_bytes_stored"] and summary["status"] == "ok"
    assert summary["predictions/nrows"] == row["n_samples"]  # the per-sample table
    assert {"model", "method", "task", "ratio"} <= config


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_multirun_through_launchers(tmp_path, launcher):
    p = cli("-m", f"hydra/launcher={launcher}", "method=full", "seed=0,1", *SMALL, "bench.enabled=false",
            f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*.json")]
    assert sorted(r["seed"] for r in rows) == [0, 1] and all(r["status"] == "ok" for r in rows)
