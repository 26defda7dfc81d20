"""Reliability (issue 18): no silently wrong row, no crash on a bad file, no arbitrary code from an override.

Each test names the item of the issue it would have caught. Most run no model: every setting is checked
before the model loads, so refusals cost a config composition, not an evaluation.
"""

import gzip
import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import results as R
from harness.run import run_job, summary_line
from harness.sweep import compose

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
FAST = ["limit=2", "context_length=256", "prefill_chunk=64", "bench.enabled=false", "progress=false"]


def cli(*args, timeout=300, module="harness.run"):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def job(tmp_path, *overrides, **kw):
    return run_job(compose([*FAST, f"results_dir={tmp_path}", *overrides]), **kw)


def rows(tmp_path):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*.json"))]


# -- 1. a context the model cannot hold ------------------------------------------------------------
def test_context_beyond_the_model_window_is_refused_before_loading(tmp_path):
    t0 = time.monotonic()
    p = cli("context_length=20000", "limit=2", f"results_dir={tmp_path}")
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    assert "max_position_embeddings" in p.stderr and "context_length=20000" in p.stderr and "8672" in p.stderr
    assert "loading model" not in p.stderr and not (tmp_path / "runs").exists()
    assert took < 20, took  # under 5 s on an idle machine: no model, no torch
    # a multirun job writes a skipped row instead, naming the limit
    row = job(tmp_path, "context_length=20000")
    assert row["status"] == "skipped" and "max_position_embeddings" in row["reason"]
    # the speed probe is held to the same window
    row = job(tmp_path, "bench.enabled=true", "bench.context_length=8700")
    assert row["status"] == "skipped" and "bench.context_length" in row["reason"]


# -- 2. only catalogue classes are built; the row names the class that ran --------------------------
def test_method_target_override_is_refused_and_runs_nothing(tmp_path):
    p = cli("method._target_=builtins.print", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "catalogue" in p.stderr and p.stdout == ""
    p = cli("method=streaming_llm", "+method.foo._target_=builtins.print", "+method.foo._args_=[PRINTED]",
            f"results_dir={tmp_path}")
    assert p.returncode == 2 and "PRINTED" not in p.stdout and "_target_" in p.stderr


def test_runner_never_instantiates_an_override(tmp_path, capsys):
    """The same configs reaching run_job without the command-line check (compose API, sweeps)."""
    over = ["method=streaming_llm", "method._target_=methods.eviction.RandomEviction"]
    row = job(tmp_path, *over, method_name="streaming_llm")  # how sweeps and regress call it
    assert row["status"] == "failed" and "method=random" in row["reason"] and row["method"] == "streaming_llm"
    row = job(tmp_path, *over, "ratio=1.5")  # without the choice, the class decides the label: truthful
    assert row["method"] == "random" and row["status"] == "skipped"
    row = job(tmp_path, "method=streaming_llm", "+method.foo._target_=builtins.print", "+method.foo._args_=[PRINTED]")
    assert row["status"] == "failed" and "_target_" in row["reason"]
    assert "PRINTED" not in capsys.readouterr().out
    from harness.run import UsageError

    with pytest.raises(UsageError, match="not the class of method streaming_llm"):
        job(tmp_path, *over, method_name="streaming_llm", strict=True)


def test_the_catalogue_knows_every_method_config():
    from methods import catalog

    names = catalog.names()
    assert names == sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
    for name in names:
        entry = catalog.get(name)
        method = entry.build(ratio=0.5)
        assert type(method).__module__ + "." + type(method).__name__ == entry.target
        assert set(entry.defaults) <= set(entry.knobs())
    with pytest.raises(catalog.CatalogError, match="did you mean snapkv"):
        catalog.get("snapkvv")
    with pytest.raises(catalog.CatalogError, match="no knob windoww .did you mean window"):
        catalog.build("snapkv", ratio=0.5, windoww=3)
    with pytest.raises(catalog.CatalogError, match="_target_"):
        catalog.build("ratequant", ratio=0.5, base_params={"_target_": "builtins.print"})


# -- 3. every top-level setting is checked, with its name and allowed values -------------------------
def test_malformed_settings_exit_2_naming_each_setting(tmp_path):
    p = cli("batch_size=0", "limit=-1", "ratio=abc", "context_length=abc", "protocol=sideways",
            f"results_dir={tmp_path}")
    assert p.returncode == 2 and not (tmp_path / "runs").exists()
    for name, allowed in (("batch_size=0", ">= 1"), ("limit=-1", "or null"), ('ratio="abc"', "finite number"),
                          ('context_length="abc"', ">= 1"), ('protocol="sideways"', "query_agnostic or query_aware")):
        line = next((ln for ln in p.stderr.splitlines() if name in ln), "")
        assert allowed in line, (name, p.stderr)
    p = cli("limit=0", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "limit=0 is not allowed" in p.stderr


def test_every_top_level_setting_has_a_schema_entry():
    """A new setting in conf/config.yaml must be checked too (harness/settings.py SCHEMA, harness/run.py TOP_LEVEL)."""
    import yaml

    from harness.run import TOP_LEVEL
    from harness.settings import SCHEMA

    conf = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())
    keys = {k for k in conf if k not in ("defaults", "hydra")}
    keys |= {f"bench.{k}" for k in conf["bench"]} - {"bench"}
    keys.discard("bench")
    assert keys <= {s.key for s in SCHEMA}, keys - {s.key for s in SCHEMA}
    assert {k.split(".")[0] for k in keys} <= set(TOP_LEVEL)


@pytest.mark.parametrize("setting", ["batch_size=0", "limit=0", "ratio=abc", "seed=-1", "prefill_chunk=0",
                                     "device=cpu device.name=tpu", "force=maybe"])
def test_a_multirun_job_with_a_malformed_setting_writes_a_failed_row(tmp_path, setting):
    row = job(tmp_path, *setting.split())
    key = setting.split()[-1].split("=")[0]
    assert row["status"] == "failed" and key in row["reason"] and "allowed" in row["reason"]
    assert R.read_row(R.row_path(tmp_path, row["run_id"]))["status"] == "failed"


# -- 4. one rule for a ratio a method cannot honour ----------------------------------------------------
@pytest.mark.parametrize("method", ["streaming_llm", "snapkv", "uniform_int", "kivi", "ratequant", "louver", "quest",
                                    "fp8", "full", "lkv"])
def test_an_out_of_range_ratio_is_a_skipped_row_for_every_method(tmp_path, method):
    row = job(tmp_path, f"method={method}", "ratio=1.5", strict=True)  # well-formed: no UsageError
    assert row["status"] == "skipped" and "ratio" in row["reason"] and "1.5" in row["reason"], row["reason"]
    assert row["model_revision"] and row["family"]  # decided before the model loaded, still a full row


def test_every_method_states_the_ratios_it_honours():
    from methods import catalog

    for name in catalog.names():
        entry = catalog.get(name)
        for bad in (1.0, 1.5, -0.25):
            m = entry.build(ratio=bad)  # no __post_init__ raises on the ratio: that would be a failed row
            assert m.ratio_reasons(), (name, bad)
        default = entry.cls()().ratio
        assert entry.build(ratio=default).ratio_reasons() == [], name


# -- 5. perplexity text must be UTF-8 -----------------------------------------------------------------
def test_perplexity_file_that_is_not_utf8_is_refused(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("caf\xe9 na\xefve " * 3000).encode("latin-1"))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    p = cli("task=ppl", f"task.file={latin}", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "not UTF-8" in p.stderr and "iconv" in p.stderr
    row = job(tmp_path, "task=ppl", f"task.file={binary}")
    assert row["status"] == "failed" and "binary" in row["reason"] and "task.file" in row["reason"]
    from tasks.synthetic import read_text_file

    ok = tmp_path / "ok.txt"
    ok.write_text("naïve café", encoding="utf-8")
    assert read_text_file(ok) == "naïve café"


# -- 6. the model directory and the model's name ------------------------------------------------------
def test_missing_model_directory_says_so(tmp_path):
    p = cli(f"model.path={tmp_path}/no-such-model", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "does not exist" in p.stderr and "huggingface-cli" not in p.stderr
    p = cli("model.path=models/no-such-model", f"results_dir={tmp_path}")
    assert p.returncode == 2 and "does not exist" in p.stderr


def test_a_model_path_override_names_the_row_after_what_was_loaded():
    from harness.run import model_label

    assert model_label({"name": "tiny", "path": "models/kvbench-tiny"}) == "tiny"
    assert model_label({"name": "tiny", "path": "/data/ckpt/my-model-v2"}) == "my-model-v2"
    assert model_label({"name": "tiny", "path": "org/some-model"}) == "org/some-model"
    assert model_label({"name": "mine", "path": "/data/x"}) == "mine"  # no conf/model/mine.yaml: its own name


# -- 7. a failed row says the device it ran on ---------------------------------------------------------
def test_a_failed_cuda_row_names_the_gpu(tmp_path, monkeypatch):
    import torch

    import harness.loading as L

    monkeypatch.setattr(L, "resolve_device", lambda name: torch.device("cuda"))

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(L, "load", boom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    row = job(tmp_path, "device=cuda")
    assert row["status"] == "failed" and "out of memory" in row["reason"]
    assert row["device"] == "NVIDIA H100 80GB HBM3"


# -- 8. a bad row file neither crashes the table nor blocks its job -------------------------------------
def test_table_skips_bad_row_files_with_one_warning_each(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir(parents=True)
    (runs / "x.json").write_bytes(os.urandom(600) + b"\xff")
    (runs / "list.json").write_text("[1, 2]")
    (runs / "empty.json").write_text("{}")
    p = subprocess.run([sys.executable, "-m", "scripts.aggregate", "--results", str(tmp_path)], cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    for name in ("x.json", "list.json", "empty.json"):
        assert sum(name in line for line in p.stderr.splitlines()) == 1, p.stderr
    assert "no rows yet" in (tmp_path / "summary.md").read_text()
    job(tmp_path, "method=full", "ratio=0.5")  # a (skipped) row beside the bad files
    p = subprocess.run([sys.executable, "-m", "scripts.aggregate", "--results", str(tmp_path)], cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0 and "| skipped | tiny |" in p.stdout and "nan" not in p.stdout


def test_rerunning_replaces_a_bad_row_file_and_keeps_it_in_history(tmp_path):
    first = job(tmp_path, "method=full", "ratio=0.5")
    path = R.row_path(tmp_path, first["run_id"])
    path.write_bytes(b"\xff\xfe not json")
    again = job(tmp_path, "method=full", "ratio=0.5")
    assert again["run_id"] == first["run_id"] and R.read_row(path)["status"] == "skipped"
    kept = list((tmp_path / "runs" / "history").glob(f"{first['run_id']}.*.json"))
    assert any(p.read_bytes() == b"\xff\xfe not json" for p in kept)


# -- 9. a multirun with failed jobs exits non-zero after every job ran -----------------------------------
@pytest.mark.slow
def test_multirun_with_a_failed_job_exits_1_and_leaves_every_row(tmp_path):
    p = cli("-m", "method=full", "context_length=256,0", "limit=1", "prefill_chunk=64", "bench.enabled=false",
            "progress=false", f"results_dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep", timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    statuses = sorted(r["status"] for r in rows(tmp_path))
    assert statuses == ["failed", "ok"]
    assert "2 jobs: 1 ok, 0 skipped, 1 failed" in p.stderr
    # stdout carries only rows (Hydra's own log lines go to stderr); one summary line per run on stderr
    assert all(json.loads(line)["run_id"] for line in p.stdout.splitlines())
    assert sum(line.startswith("[kvbench] ok ") or line.startswith("[kvbench] failed ")
               for line in p.stderr.splitlines()) == 2


# -- 10. signals reach the runs ------------------------------------------------------------------------
def test_sigterm_to_a_sweep_stops_its_multirun(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = textwrap.dedent(f"""
        import sys
        from harness.sweep import supervise
        sys.exit(supervise([sys.executable, "-c",
            "import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(120)"], total=7))
    """)
    sup = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=30)
    assert sup.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines() == ["interrupted: 0 of 7 runs done, their rows are kept; rerun the same command "
                                        "to resume (finished runs are skipped)"]
    for _ in range(100):  # the child got the signal too: it is gone, not orphaned
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the multirun child outlived its sweep")


def test_ctrl_c_on_a_sweep_prints_one_line_and_exits_non_zero(tmp_path):
    """Issue 25: the terminal's SIGINT reaches the whole process group; one line, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "harness.sweep", "method=knorm", *FAST, f"results_dir={tmp_path}",
                          f"hydra.sweep.dir={tmp_path}/sweep"], cwd=REPO, env=ENV, stderr=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(tmp_path.glob("sweep/*")):  # a job has started
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1 and "of 12 runs done" in lines[0] and "rerun the same command" in lines[0], err[-2000:]


# -- 11. the row writer under concurrency, and the files' mode -------------------------------------------
def _writer(args):
    results_dir, n, tag = args
    for i in range(n):
        R.write_row(results_dir, {"run_id": "same", "status": "ok", "writer": tag, "i": i})
    return tag


def test_concurrent_writers_of_one_run_id_keep_every_row(tmp_path):
    n, procs = 15, 3
    with mp.get_context("spawn").Pool(procs) as pool:
        assert sorted(pool.map(_writer, [(str(tmp_path), n, t) for t in range(procs)])) == list(range(procs))
    assert [p.name for p in (tmp_path / "runs").glob("*.json")] == ["same.json"]
    assert len(list((tmp_path / "runs" / "history").glob("same.*.json"))) == n * procs - 1
    assert not list((tmp_path / "runs").glob(".*"))  # no temporary or lock file left behind


def test_two_identical_runs_started_together_leave_one_row_and_one_history_entry(tmp_path):
    args = ["method=uniform_int", "ratio=0.8125", *FAST, f"results_dir={tmp_path}"]  # a quick (skipped) run
    procs = [subprocess.Popen([sys.executable, "-m", "harness.run", *args], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert len(list((tmp_path / "runs").glob("*.json"))) == 1
    assert len(list((tmp_path / "runs" / "history").glob("*.json"))) == 1


def test_row_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = R.write_row(tmp_path, {"run_id": "m", "status": "ok"}, samples=[{"score": 1.0}])
        assert path.stat().st_mode & 0o777 == 0o644
        assert R.samples_path(tmp_path, "m").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        assert R.write_row(tmp_path, {"run_id": "m", "status": "ok"}).stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# -- 12. strict JSON -----------------------------------------------------------------------------------
def test_rows_are_strict_json(tmp_path):
    def strict_load(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in a row"))

    row = {"run_id": "n", "status": "ok", "ratio": float("nan"), "accuracy": float("inf"), "m.x": [float("-inf"), 1.0]}
    path = R.write_row(tmp_path, row, samples=[{"score": float("nan")}])
    back = strict_load(path.read_text())
    assert back["ratio"] is None and back["accuracy"] is None and back["m.x"] == [None, 1.0]
    assert strict_load(R.dumps(row))["ratio"] is None
    with gzip.open(R.samples_path(tmp_path, "n"), "rt") as f:
        assert strict_load(f.readline())["score"] is None
    p = cli("ratio=nan", f"results_dir={tmp_path}")  # not a finite number: refused, no row
    assert p.returncode == 2 and "ratio=nan" in p.stderr


# -- 1 (truncation) and issue 22 item 5: per-sample predictions beside each row ------------------------
def test_a_truncated_prompt_is_in_the_reason_and_samples_are_kept(tmp_path, monkeypatch):
    """A prompt that does not fit is cut in the middle and the row's reason says so (not only n_truncated);
    every row keeps its per-sample predictions in samples/<run_id>.jsonl.gz."""
    import harness.settings as S

    monkeypatch.setattr(S, "generation_reserve", lambda task: 0)  # let the pre-check pass a tight window
    row = job(tmp_path, "method=streaming_llm", "ratio=0.5", "model.max_length=256", "limit=3")
    assert row["status"] == "ok" and row["n_truncated"] == 3
    assert "3 of 3 prompts" in row["reason"] and "cut in the middle" in row["reason"]
    recs = R.read_samples(R.samples_path(tmp_path, row["run_id"]))
    assert len(recs) == row["n_samples"] == 3
    for r in recs:
        assert set(r) >= {"doc_id", "prompt_id", "expected", "generated", "score"}
        assert r["prompt_id"].startswith("niah_single:256:eval:0:") and isinstance(r["generated"], str)
        assert isinstance(r["expected"], list) and r["expected"]
    assert math.isclose(sum(r["score"] for r in recs) / 3, row["accuracy"])
    line = summary_line(row, "x.json", metric="accuracy")
    assert line.startswith("ok      streaming_llm ratio=0.5 niah_single@256: accuracy ") and line.endswith("-> x.json")
    assert "achieved 0.5" in line and "cut in the middle" in line


def test_a_row_names_the_commit_the_caller_sent(monkeypatch):
    """The GPU machine's copy of the tree carries a .git that is not the sent commit (DEVELOPERS.md): the row takes
    KVBENCH_GIT_SHA / KVBENCH_GIT_DIRTY when they are set, and its own git otherwise."""
    monkeypatch.delenv("KVBENCH_GIT_SHA", raising=False)
    own = R.environment()
    assert own["git_sha"] is None or len(own["git_sha"]) == 40  # None: a tree without git
    monkeypatch.setenv("KVBENCH_GIT_SHA", "0" * 40)
    monkeypatch.setenv("KVBENCH_GIT_DIRTY", "0")
    assert (R.environment()["git_sha"], R.environment()["git_dirty"]) == ("0" * 40, False)
    monkeypatch.delenv("KVBENCH_GIT_DIRTY")
    assert R.environment()["git_dirty"] is None  # not known: not claimed clean
    # the process's first stamp holds for its later rows (a commit made while a grid runs relabels nothing)
    monkeypatch.delenv("KVBENCH_GIT_SHA")
    calls = []
    monkeypatch.setattr(R, "_git", lambda *a: calls.append(a) or ("f" * 40 if a[0] == "rev-parse" else ""))
    R._code_state.cache_clear()
    try:
        assert [R.environment()["git_sha"] for _ in range(3)] == ["f" * 40] * 3 and len(calls) == 2
    finally:
        R._code_state.cache_clear()


def test_rope_scaling_stretches_the_window_and_the_positions():
    """model.rope (issue 23, question 1: contexts beyond the trained window): the loader merges it into the config's
    rope_parameters and stretches max_position_embeddings by its factor; the window check before loading agrees;
    linear scaling by 2 puts position 2p where p was; a malformed value is refused naming the setting."""
    import torch

    from harness import settings as S
    from harness.loading import load

    base = {"name": "tiny", "path": "models/kvbench-tiny", "dtype": "float32"}
    rope = {"rope_type": "linear", "factor": 2.0}
    cfg = {"context_length": 12000, "task": {"name": "niah_single"}, "bench": {"enabled": False}}
    assert "does not fit" in " ".join(S.fit_problems({**cfg, "model": base}))
    assert S.fit_problems({**cfg, "model": {**base, "rope": rope}}) == []
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    a = AutoConfig.from_pretrained(base["path"])
    b = load({**base, "rope": rope}, device="cpu").model
    assert (a.max_position_embeddings * 2, a.rope_parameters["rope_theta"]) == (
        b.config.max_position_embeddings, b.config.rope_parameters["rope_theta"])
    x = torch.zeros(1, 1, 8)
    for u, v in zip(LlamaRotaryEmbedding(a)(x, position_ids=torch.tensor([[10]])),
                    b.model.rotary_emb(x, position_ids=torch.tensor([[20]]))):
        torch.testing.assert_close(u, v)
    def rope_problems(value):
        return [m for m in S.check({"model": {**base, "rope": value}}) if m.startswith("model.rope")]

    assert rope_problems(rope) == [] and rope_problems(None) == []
    assert "rope_type" in rope_problems({"factor": 4})[0] and rope_problems({"rope_type": "linear", "factor": 0.5})


def test_an_evaluation_beyond_the_window_takes_rope_scaling(tmp_path):
    """harness.evaluate.Evaluator (question 1's 16x lengths): --rope-beyond-window gives lengths beyond the model's
    window the smallest power-of-two linear factor that fits, and none within it."""
    import argparse

    from harness.evaluate import Evaluator

    ev = Evaluator(argparse.Namespace(rope_beyond_window="linear", max_new_tokens=32, device="cpu"), tmp_path)
    assert ev.rope_for("tiny", 4096) is None
    assert ev.rope_for("tiny", 20000) == {"rope_type": "linear", "factor": 4.0}  # 20032 over 8704 positions
    assert Evaluator(argparse.Namespace(max_new_tokens=32, device="cpu"), tmp_path).rope_for("tiny", 20000) is None
