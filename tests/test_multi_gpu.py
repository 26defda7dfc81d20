"""Beyond one GPU (issue 24, harness/devices.py), proved on the CPU.

- Many jobs: ``hydra/launcher=joblib_gpus`` pins each joblib worker to a GPU of its own, for every job the worker
  runs (loky reuses workers), and a job that finds no free GPU fails with its row instead of running unpinned.
  The GPUs are ids in ``CUDA_VISIBLE_DEVICES``: on this machine the pool is named (0, 1) and each job reports
  the id it saw; rows equal the serial run's.
- One model over several devices: ``device=split``. Two CPU "devices" cannot tell tensors apart, so the split is
  proved twice: with both halves on the CPU through accelerate's hooks (the rows, the fused step's cross-device
  path) and with the second half on the meta device, where every tensor op refuses an input from the CPU: a
  forward pass through both halves proves each layer's store, positions and validity live on its layer's device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import devices as D
from harness.engine import Engine, Prompt

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
SMALL = ["limit=3", "context_length=256", "prefill_chunk=64", "bench.enabled=false", "progress=false"]
SPLIT_CPU = ["device=split", "device.name=cpu", "device.split_over=[cpu,cpu]"]


# --------------------------------------------------------------------------------------------------
# many jobs, one GPU each

APP = '''
import json, os, sys, time
from pathlib import Path
import hydra
CONF, OUT = sys.argv.pop(1), Path(sys.argv.pop(1))

@hydra.main(version_base="1.3", config_path=CONF, config_name="config")
def app(cfg):
    from hydra.core.hydra_config import HydraConfig
    from harness.devices import pin_error
    t0 = time.time()
    time.sleep(0.5)  # jobs overlap in time
    (OUT / f"{HydraConfig.get().job.num}.json").write_text(json.dumps({
        "seed": cfg.seed, "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "error": pin_error(),
        "t0": t0, "t1": time.time()}))

app()
'''


def _sweep(tmp_path: Path, *overrides: str, n: int = 5) -> list[dict]:
    app, out = tmp_path / "app.py", tmp_path / "out"
    app.write_text(APP)
    out.mkdir()
    p = subprocess.run(
        [sys.executable, str(app), str(REPO / "conf"), str(out), "-m", "hydra/launcher=joblib_gpus",
         f"hydra.callbacks.pin_gpu.lock_dir={tmp_path / 'locks'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         "seed=" + ",".join(map(str, range(n))), *overrides],
        cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads((out / f"{i}.json").read_text()) for i in range(n)]


def _check_pinning(jobs: list[dict], pool: set[str]) -> dict[int, set]:
    """Every job saw one GPU of the pool, the one its worker holds; different workers hold different GPUs;
    jobs running at the same time saw different GPUs."""
    assert all(j["error"] is None for j in jobs), jobs
    assert {j["gpu"] for j in jobs} <= pool
    by_pid: dict[int, set] = {}
    for j in jobs:
        by_pid.setdefault(j["pid"], set()).add(j["gpu"])
    assert all(len(g) == 1 for g in by_pid.values()), by_pid
    assert len(set.union(*by_pid.values())) == len(by_pid) <= len(pool), by_pid
    for a in jobs:
        for b in jobs:
            if a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                assert a["gpu"] != b["gpu"], (a, b)
    return by_pid


def test_joblib_gpus_gives_every_job_the_gpu_of_its_worker_and_never_two_at_once(tmp_path):
    """Five jobs on two GPUs: joblib reuses its two workers, and every job (not only a worker's first) sees the
    GPU its worker holds; jobs running at the same time see different GPUs."""
    jobs = _sweep(tmp_path, "hydra.callbacks.pin_gpu.gpus=[0,1]")
    by_pid = _check_pinning(jobs, {"0", "1"})
    assert len(by_pid) == 2 and {j["gpu"] for j in jobs} == {"0", "1"}  # n_jobs: 0 became one worker per GPU
    assert max(sum(j["pid"] == pid for j in jobs) for pid in by_pid) >= 3  # a worker ran several jobs


def test_more_workers_than_gpus_are_cut_to_one_per_gpu(tmp_path):
    jobs = _sweep(tmp_path, "hydra.callbacks.pin_gpu.gpus=[3]", "hydra.launcher.n_jobs=2", n=2)
    assert [j["gpu"] for j in jobs] == ["3", "3"] and len({j["pid"] for j in jobs}) == 1


def test_a_job_without_a_free_gpu_fails_with_its_row(tmp_path, monkeypatch):
    """Another sweep holds every GPU of the pool: the job must not run unpinned; its row says why."""
    import fcntl

    from harness.run import run_job
    from harness.sweep import compose

    monkeypatch.setattr(D, "_HELD", {})
    locks = tmp_path / "locks"
    locks.mkdir()
    held = [open(locks / f"gpu-{g}.lock", "a+") for g in ("0", "1")]  # noqa: SIM115
    for f in held:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 1 on another sweep\n")
        f.flush()
    cb = D.PinGpu(gpus=[0, 1], lock_dir=str(locks))
    cb.on_job_start(config={})
    assert "held by another kvbench worker" in D.pin_error() and "another sweep" in D.pin_error()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] not in ("0", "1")
    row = run_job(compose([*SMALL, f"results_dir={tmp_path}", "method=full"]), method_name="full")
    assert row["status"] == "failed" and row["reason"].startswith("RuntimeError: no GPU for this job")
    for f in held:
        f.close()


def test_gpu_pool_and_pin_errors(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert D.gpu_pool("auto") == ["2", "5"]
    assert D.gpu_pool(3) == ["0", "1", "2"] and D.gpu_pool([4, "GPU-ab"]) == ["4", "GPU-ab"]
    with pytest.raises(ValueError, match="pool is empty"):
        D.pin_process([])


@pytest.mark.slow
def test_joblib_gpus_rows_are_the_serial_rows(tmp_path):
    """harness.run over two local jobs with the launcher: each job reports its GPU id, and the rows equal
    those of the same jobs run one after the other in this process."""
    from harness.run import run_job
    from harness.sweep import compose

    par = tmp_path / "par"
    p = subprocess.run(
        [sys.executable, "-m", "harness.run", "-m", "hydra/launcher=joblib_gpus", "hydra.callbacks.pin_gpu.gpus=[0,1]",
         f"hydra.callbacks.pin_gpu.lock_dir={tmp_path / 'locks'}", "method=streaming_llm", "ratio=0.5",
         "task=niah_single,niah_multikey", *SMALL, "limit=2", f"results_dir={par}", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    pinned = sorted(re.findall(r"job \d+ runs on GPU (\w+)", p.stderr))  # two workers' lines may interleave
    assert pinned == ["0", "1"], p.stderr[-2000:]
    rows = {r["task"]: r for r in (json.loads(f.read_text()) for f in (par / "runs").glob("*.json"))}
    assert sorted(rows) == ["niah_multikey", "niah_single"]
    for task, r in rows.items():
        serial = run_job(compose([*SMALL, "limit=2", f"results_dir={tmp_path / 'ser'}", "method=streaming_llm",
                                  "ratio=0.5", f"task={task}"]), method_name="streaming_llm")
        assert r["run_id"] == serial["run_id"]  # the launcher is not part of a run's identity
        _same_results(r, serial)
    from scripts import compare_rows  # what the GPU machine's wall-time comparison runs

    assert compare_rows.main([str(par), str(tmp_path / "ser")]) == 0


def _same_results(a: dict, b: dict) -> None:
    from harness import results as R

    env = set(R.ENV_COLUMNS) | {"config", "calibrate_ms", "peak_mem_prefill_bytes", "peak_mem_decode_bytes"}
    cols = [c for c in R.COLUMNS if c not in env and c not in R.SPEED_COLUMNS and c not in ("run_id",)]
    assert a["status"] == "ok", a["reason"]
    assert {c: a[c] for c in cols} == {c: b[c] for c in cols}


# --------------------------------------------------------------------------------------------------
# one model over several devices


def _meta_llama(n_layers: int = 4):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "models" / "llama3_1_70b_shape")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_split_map_balances_contiguous_layer_groups():
    """Llama-3.1-70B's shape (meta device, no memory) over 2, 4 and 8 GPUs: contiguous groups in order, the
    embedding with the first, norm and LM head with the last, the most loaded GPU within a layer of the mean."""
    model = _meta_llama()
    layer = D._nbytes(model.model.layers[0])
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 140e9 < total < 142e9  # 141 GB in bf16: more than one GPU
    for n in (1, 2, 4, 8):
        devs = [f"cuda:{i}" for i in range(n)]
        dm = D.split_map(model, devs)
        order = [dm[f"model.layers.{i}"] for i in range(80)]
        assert order == sorted(order, key=devs.index) and set(order) == set(devs)
        assert dm["model.embed_tokens"] == dm["model.rotary_emb"] == devs[0]
        assert dm["model.norm"] == dm["lm_head"] == devs[-1]
        load = {d: sum(D._nbytes(model.get_submodule(k)) for k, v in dm.items() if v == d) for d in devs}
        assert max(load.values()) - total / n < layer, (n, load)


def test_split_map_keeps_a_tied_head_with_the_embedding():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "models" / "kvbench-tiny")
    assert config.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dm = D.split_map(model, ["cuda:0", "cuda:1"])
    assert dm["lm_head"] == dm["model.embed_tokens"] == "cuda:0" and dm["model.norm"] == "cuda:1"
    # the 1.6M-parameter tied table weighs about a layer: one layer joins it on cuda:0
    assert [dm[f"model.layers.{i}"] for i in range(4)] == ["cuda:0", "cuda:1", "cuda:1", "cuda:1"]


def test_split_devices_resolve_and_refuse():
    assert D.split_devices(["cpu", "cpu"], "cpu") == ["cpu", "cpu"]
    with pytest.raises(ValueError, match="counts GPUs"):
        D.split_devices("all", "cpu")
    with pytest.raises(ValueError, match="mixes device types"):
        D.split_devices(["cuda:0", "cpu"], "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees 0 GPU"):
            D.split_devices(["cuda:0", "cuda:1"], "cuda")


def test_graph_blocker_names_the_devices():
    assert D.graph_blocker([torch.device("cuda:0")]) is None
    why = D.graph_blocker([torch.device("cuda:0"), torch.device("cuda:1")])
    assert "2 devices (cuda:0, cuda:1)" in why and "CUDA graph" in why


def _split_cpu_meta(model):
    """Layers split over the CPU and the meta device through accelerate's hooks (as over two GPUs)."""
    dm = D.split_map(model, ["cpu", "meta"])
    for name, dev in dm.items():
        model.get_submodule(name).to(dev)
    return D.dispatch(model, dm)


@pytest.mark.parametrize("method,ratio", [("full", 0.0), ("kivi", 0.75), ("turboquant_kv", 0.75), ("quest", 0.75),
                                          ("h2o", 0.5), ("louver", 0.9)])
def test_each_layer_store_lives_on_its_layer_device(method, ratio):
    """Half the layers on the meta device: the stores of those layers are allocated there, and prefill passes
    through both halves (a CPU tensor reaching a meta layer raises). Meta tensors hold no values, so this
    proves placement and plumbing, not numbers (the CPU/CPU tests below prove the numbers)."""
    import yaml
    from hydra.utils import instantiate

    from harness.models import build_random_model, tiny_config
    from methods.stores import walk_tensors

    model = _split_cpu_meta(build_random_model(tiny_config("llama", n_layers=4), seed=0))
    cfg = yaml.safe_load((REPO / "conf" / "method" / f"{method}.yaml").read_text())
    engine = Engine(model, instantiate(cfg, ratio=ratio, _convert_="all"), prefill_chunk=8)
    assert [d.type for d in engine.layer_devices] == ["cpu", "cpu", "meta", "meta"]
    state = engine.new_state(2, 48)
    for dev, store in zip(engine.layer_devices, state.layers):
        found = {t.device for name, t in walk_tensors(store) if not name.startswith("method")}
        assert found == {dev}, (dev, found)
    ids = torch.randint(3, 200, (2, 8))
    pos = torch.arange(8).repeat(2, 1)
    valid = torch.ones(2, 8, dtype=torch.bool)
    for s in (0, 8):  # two chunks: the second attends to the first as stored on each device
        assert engine.forward(state, ids, pos + s, valid) is None
    assert state.attention_calls == 2 * 4


@pytest.mark.slow
def test_split_rows_equal_one_device_rows(tmp_path):
    """The runner with device=split (both halves on the CPU, through accelerate's hooks) writes the row a
    one-device run writes: accuracy, bytes stored and read, kernel."""
    from harness.loading import _CACHE
    from harness.run import run_job
    from harness.sweep import compose

    over = [*SMALL, "limit=2", f"results_dir={tmp_path}", "method=kivi", "ratio=0.75"]
    one = run_job(compose(over), method_name="kivi")
    split = run_job(compose([*over, *SPLIT_CPU]), method_name="kivi")
    assert split["run_id"] != one["run_id"]
    _same_results(split, one)
    loaded = [v for k, v in _CACHE.items() if k[-1] == ("cpu", "cpu")]  # the key ends with the device(s)
    assert loaded, "the split run did not load through harness.loading's split path"
    model = loaded[0].model
    assert all(hasattr(layer, "_hf_hook") for layer in model.model.layers)  # accelerate moves each block's inputs
    assert set(model.hf_device_map.values()) == {"cpu"}


@pytest.mark.parametrize("method,ratio", [("full", 0.0), ("uniform_int", 0.75), ("snapkv", 0.5)])
def test_split_model_generates_what_one_device_generates(method, ratio):
    """harness.loading's split path (the embedded model, both halves on the CPU through accelerate's hooks):
    tokens, logits and byte counts equal to the one-device model's, for a method of each family."""
    import yaml
    from hydra.utils import instantiate

    from harness.loading import load

    cfg = {"path": "models/kvbench-tiny", "revision": None, "random_init": False, "dtype": "auto", "tokenizer": None}
    g = torch.Generator().manual_seed(1)
    prompts = [Prompt(context=torch.randint(5, 4000, (n,), generator=g).tolist(), question=[11, 12]) for n in (90, 60)]
    mcfg = yaml.safe_load((REPO / "conf" / "method" / f"{method}.yaml").read_text())
    outs = []
    for split in (None, ["cpu", "cpu"]):
        model = load(cfg, device="cpu", split_over=split).model
        engine = Engine(model, instantiate(mcfg, ratio=ratio, _convert_="all"), prefill_chunk=32)
        outs.append(engine.generate(prompts, max_new_tokens=4, return_logits=True))
    one, split = outs
    assert split.tokens == one.tokens
    assert all(torch.equal(a, b) for a, b in zip(split.logits, one.logits))
    for a, b in ((split.stats_context, one.stats_context), (split.stats_final, one.stats_final)):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name


def test_random_split_build_is_deterministic_and_complete():
    from harness.models import tiny_config

    config = tiny_config("llama", n_layers=3)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        dm = D.split_map(AutoModelForCausalLM.from_config(config), ["cpu", "cpu"])
    a = D.build_random_split(config, dm, dtype=torch.float32, seed=0)
    b = D.build_random_split(config, dm, dtype=torch.float32, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ref = AutoModelForCausalLM.from_config(config)
    assert torch.equal(a.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)  # recomputed, not garbage
    std = float(a.model.layers[0].mlp.up_proj.weight.detach().std())
    assert abs(std - config.initializer_range) < 0.01 and bool((a.model.norm.weight == 1).all())


def test_fused_step_across_devices_matches_one_device(interpret):
    """The fused decode step's cross-device path (each layer on its own device, the residual stream moved
    between them, inputs copied per device, logits back on the input's device), run with both halves on the
    CPU through accelerate's hooks: the same tokens and logits, bit for bit, as the one-device fused step
    (which tests/test_fused_decoder.py holds to the module path)."""
    from harness.fused_decoder import for_model
    from harness.models import build_random_model, tiny_config
    from methods.full import Full

    config = tiny_config("llama", n_layers=2)
    g = torch.Generator().manual_seed(3)
    prompts = [Prompt(context=torch.randint(3, 256, (n,), generator=g).tolist()) for n in (11, 7)]
    outs = {}
    for name in ("one", "split"):
        model = build_random_model(config, seed=0)
        if name == "split":
            model = D.dispatch(model, D.split_map(model, ["cpu", "cpu"]))
            for_model(model).multi_device = True  # as if the halves sat on two GPUs
        engine = Engine(model, Full(), prefill_chunk=8, fused_layers="on")
        outs[name] = engine.generate(prompts, max_new_tokens=4, return_logits=True)
    assert outs["split"].tokens == outs["one"].tokens
    for a, b in zip(outs["split"].logits, outs["one"].logits):
        assert torch.equal(a, b)


def test_roofline_is_none_off_cuda_and_splits_kv_by_layer():
    from harness.models import build_random_model, tiny_config

    model = build_random_model(tiny_config("llama", n_layers=2), seed=0)
    assert D.roofline_ms(model, kv_bytes=1000) is None
    w = D.bytes_per_device(model)
    emb = model.get_input_embeddings().weight
    assert w[torch.device("cpu")] == sum(p.numel() * 4 for p in model.parameters())
    skipped = D.bytes_per_device(model, skip_input_embedding=True)[torch.device("cpu")]
    assert skipped == w[torch.device("cpu")] - emb.numel() * 4


# --------------------------------------------------------------------------------------------------
# the GPU machine: several GPUs


def _gpus(n: int):
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


@pytest.mark.gpu
def test_split_over_two_gpus_decodes_as_one_gpu():
    """Llama-style random model split over cuda:0 and cuda:1: stores on their layer's GPU, the fused step per
    layer (no CUDA graph, the reason names the devices), greedy tokens equal to the one-GPU run."""
    _gpus(2)
    from harness.models import build_random_model, tiny_config
    from methods.full import Full

    config = tiny_config("llama", n_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                         head_dim=64)
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(context=torch.randint(3, 256, (n,), generator=g).tolist()) for n in (300, 170)]
    outs = {}
    for name in ("one", "split"):
        model = build_random_model(config, seed=0, dtype=torch.bfloat16)
        if name == "one":
            model = model.to("cuda:0")
        else:
            dm = D.split_map(model, ["cuda:0", "cuda:1"])
            for k, d in dm.items():
                model.get_submodule(k).to(d)
            model = D.dispatch(model, dm)
        engine = Engine(model, Full(), prefill_chunk=128)
        outs[name] = engine.generate(prompts, max_new_tokens=16)
        if name == "split":
            assert [d.index for d in engine.layer_devices] == [0, 0, 1, 1]
            assert engine.fused is not None and engine.graph_error and "cuda:0, cuda:1" in engine.graph_error
            state = engine.new_state(1, 8)
            assert [s.k.device.index for s in state.layers] == [0, 0, 1, 1]
    assert outs["split"].tokens == outs["one"].tokens


@pytest.mark.gpu
def test_joblib_gpus_on_this_host(tmp_path):
    """The pinning with the host's real pool (every GPU torch sees): jobs land on distinct GPUs per worker."""
    _gpus(2)
    pool = D.gpu_pool("auto")  # the shell's CUDA_VISIBLE_DEVICES, else every GPU
    jobs = _sweep(tmp_path, n=2 * len(pool))
    by_pid = _check_pinning(jobs, set(pool))
    assert len(by_pid) >= 2
