"""Decode-speed benchmark on the GPU machine: kvbench ``full`` against the Hugging Face engines (docs/ARCHITECTURE.md §7).

    python -m scripts.bench                                   # every cell, every engine (several GPU calls' worth)
    python -m scripts.bench --engines kvbench,hf_eager --cells 1x32768,8x32768
    python -m scripts.bench --report                          # merge the rows of this commit into the report only
    python -m scripts.bench --smoke                           # seconds, on CPU: a tiny random Llama (tests)
    python -m scripts.bench --methods full,fp8:0.5,uniform_int:0.75 --cells 8x32768,1x32768   # methods side by side

Model ``llama3_8b_shape`` (Llama-3.1-8B's config, random bf16 weights), cells batch x context. Engines, in
one process with the model loaded once:
- ``kvbench``: ``method=full`` through :class:`harness.engine.Engine`, i.e. the runner's throughput probe
  (:func:`harness.measure.throughput_probe`): chunked prefill of random tokens, then greedy decode; on CUDA
  the fused kernels and the CUDA-graph decode step of :mod:`harness.fused_decoder` (rows say which attention
  kernel and which layers ran). ``kvbench_modules`` (not in the default list) is the same with the decode step
  through the Hugging Face modules (``fused_layers=off``): what the fused layers are worth.
- ``hf_eager``: ``model(...)`` with a ``DynamicCache``, SDPA attention, eager decode loop.
- ``hf_static_compile``: ``StaticCache`` + ``torch.compile(mode="reduce-overhead", fullgraph=True)`` of the
  decode forward (compiled once per cell, the compile not timed).
Every engine prefills the same random tokens with flash-style kernels (kvbench's own, SDPA for HF) in chunks of
``--prefill-tokens`` / batch tokens per row and asks for no context logits; only the decode steps are compared. Per cell and engine: decode ms/token p50
and p90 (CUDA events around each step, after ``--warmup`` untimed steps), tokens/s, prefill tokens/s, peak
memory of the prefill and of the decode, and ``roofline_ms`` = (weight bytes read per step, the input
embedding table excluded unless tied, + KV bytes read per step, each KV head once, at the cell's context)
/ bandwidth, the bandwidth measured in the same process by a device-to-device copy of 4 GiB;
``roofline_frac`` = roofline_ms / decode p50. Cells whose KV alone exceeds the device are listed as
skipped with the figure. ``--capacity`` adds the largest batch of kvbench ``full`` that decodes within an
80 GB budget at 32K (what an H100-80GB user gets), found with random K/V (no prefill) under
``torch.cuda.set_per_process_memory_fraction``. ``--profile N`` adds, per cell, where a kvbench decode step's
time goes: torch.profiler over N steps, kernel time per step by category (attention, GEMM, norm, KV write,
elementwise, other) and the top kernels; the place to start when ``roofline_frac`` is low.

``--methods name[:ratio[:key=value...]],...`` (any conf/method name, built from its YAML without Hydra, validated,
calibrated on random tokens when it fits something, the fit timed as ``calibrate_ms``): one kvbench row per method
and ratio per cell, carrying ``method``, ``ratio`` and ``label``, with ``kv_bytes_read_per_step`` (what the store
says one decode step reads), the method's own roofline ((weights read + KV read) / bandwidth) and, in the report,
decode ms as a multiple of ``full``'s in the same call (put ``full`` first in the list) and issue 20's targets.
``--calibrate specs`` times those methods' calibration first (RateQuant's fit; rows of kind ``calibration``).

Rows go to ``results/bench/rows/<device>-<commit>.jsonl`` (appended: several calls at one commit merge)
and the report to ``results/bench/<device>-<date>-<commit>.md`` (commit, command, the three engines side by
side per cell). Imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent

CELLS = "1x8192,1x32768,1x131072,8x8192,8x32768,32x8192"
TOO_BIG = "8x131072,32x32768"  # listed as skipped with their KV size
ENGINES = ("kvbench", "hf_eager", "hf_static_compile")
EXTRA_ENGINES = ("kvbench_modules",)  # ablation: kvbench with its decode step through the HF modules
BUDGET_80GB = 80e9


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_cells(spec: str) -> list[tuple[int, int]]:
    out = []
    for c in filter(None, spec.split(",")):
        try:
            b, s = c.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise SystemExit(f"bad cell {c!r}: write batch x context, e.g. 8x32768") from None
    return out


def kv_bytes_per_token(config: Any, itemsize: int = 2) -> int:
    """K and V of one token over all layers, each KV head once."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def weight_bytes_read(model: Any) -> int:
    """Bytes of weights one decode step reads: all of them but the input embedding table (a step reads B
    rows of it), unless the table is tied to the LM head (which reads all of it)."""
    from harness.measure import weights_bytes

    total = weights_bytes(model)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and (head.weight is emb or (emb.device.type != "meta"
                                                          and head.weight.data_ptr() == emb.data_ptr()))
    return int(total - (0 if tied else emb.numel() * emb.element_size()))


def meta_model(name: str) -> Any:
    """The conf/model ``name`` on the meta device (shapes and dtype, no memory): what ``--report`` needs to
    merge rows on a machine without the GPU."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    from harness.loading import resolve_dtype

    config = AutoConfig.from_pretrained(REPO / cfg["path"])
    dtype = resolve_dtype(cfg.get("dtype"), torch.device("cuda"), config)  # what load(..., device="cuda") picks
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def pcts(xs: list[float]) -> tuple[float, float]:
    from harness.measure import percentile

    return percentile(xs, 0.5), percentile(xs, 0.9)


class CudaTimer:
    """Per-step device time with CUDA events (host time on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> CudaTimer:
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = 1000 * (time.perf_counter() - self.t0)


def chunk_for(B: int, args: argparse.Namespace) -> int:
    """Prefill chunk (tokens per row per forward pass) of a batch of B rows."""
    return max(16 if args.smoke else 256, args.prefill_tokens // B)


def random_ids(B: int, S: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(vocab, 32000), (B, S), generator=g).to(device)


# --------------------------------------------------------------------------------------------------
# Methods (--methods): any conf/method name, without Hydra


class MethodSpec:
    """``name[:ratio[:key=value...]]`` (e.g. ``fp8:0.5``, ``ratequant:0.75:base=quarot``): the conf/method YAML's
    ``_target_`` class with its defaults, the ratio and the overrides (values parsed as YAML)."""

    def __init__(self, text: str):
        import yaml

        parts = text.split(":")
        self.label, self.name = text, parts[0]
        self.ratio = float(parts[1]) if len(parts) > 1 and parts[1] else None
        self.overrides = {}
        for kv in parts[2:]:
            if "=" not in kv:
                raise SystemExit(f"bad method spec {text!r}: write name:ratio:key=value")
            k, v = kv.split("=", 1)
            self.overrides[k] = yaml.safe_load(v)
        path = REPO / "conf" / "method" / f"{self.name}.yaml"
        if not path.exists():
            have = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
            raise SystemExit(f"unknown method {self.name!r}; available: {', '.join(have)}")
        self.cfg = yaml.safe_load(path.read_text()) or {}

    def build(self, model: Any) -> tuple[Any, float | None]:
        """(the method, calibrate ms or None): validated for ``model`` (ValueError with the reasons), calibrated
        when it fits something (RateQuant) on random token ids, uncached, timed."""
        import importlib
        import tempfile

        from methods.api import CalibrationContext, MethodBase, ModelSpec

        cfg = {k: v for k, v in self.cfg.items() if k != "_target_"}
        cfg.update(self.overrides)
        if self.ratio is not None:
            cfg["ratio"] = self.ratio
        if "cache" in cfg:
            cfg["cache"] = False  # time the fit, not a cached file
        mod, _, cls = self.cfg["_target_"].rpartition(".")
        method = getattr(importlib.import_module(mod), cls)(**cfg)
        spec = ModelSpec.from_config(model.config)
        reasons = method.validate(spec)
        if reasons:
            raise ValueError("; ".join(reasons))
        if type(method).calibrate is MethodBase.calibrate:  # fits nothing
            return method, None
        from harness.calibration import engine_runner

        dev = next(model.parameters()).device
        g = torch.Generator().manual_seed(1234)
        high = max(2, min(model.config.vocab_size, 32000))

        def make_samples(n: int, length: int) -> list[torch.Tensor]:
            return [torch.randint(1, high, (length,), generator=g) for _ in range(n)]

        with tempfile.TemporaryDirectory() as tmp:
            ctx = CalibrationContext(model=model, spec=spec, samples=[], device=dev, dtype=next(model.parameters()).dtype,
                                     artifacts_dir=tmp, run=engine_runner(model), make_samples=make_samples)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            method.calibrate(ctx)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            ms = 1000 * (time.perf_counter() - t0)
        return method, ms


# --------------------------------------------------------------------------------------------------
# Engines: each returns the measured columns of one cell


def run_kvbench(model: Any, B: int, S: int, args: argparse.Namespace, fused_layers: str = "auto",
                method: Any = None) -> dict[str, Any]:
    from harness.engine import Engine
    from harness.measure import throughput_probe
    from methods.full import Full

    engine = Engine(model, method if method is not None else Full(), prefill_chunk=chunk_for(B, args),
                    fused_layers=fused_layers)
    probe = throughput_probe(engine, batch_size=B, context_length=S, decode_steps=args.steps + args.warmup,
                             vocab_size=model.config.vocab_size, seed=args.seed)
    graph_safe = engine.new_state(1, 8).graph_safe  # whether the decode step was captured (stores declare it)
    return {
        "kernel": engine.kernel,
        "cuda_graph": graph_safe and engine.graph_error is None and engine.device.type == "cuda",
        "kv_bytes_read_per_step": probe["probe_kv_bytes_read_per_step"],
        "graph_error": engine.graph_error, "layers": "fused" if engine.fused is not None else "modules",
        "layers_reason": engine.fused_layers_reason,
        "decode_ms_p50": probe["decode_ms_p50"], "decode_ms_p90": probe["decode_ms_p90"],
        "prefill_tok_s": probe["prefill_tok_s"], "peak_mem_prefill_bytes": probe["peak_mem_prefill_bytes"],
        "peak_mem_decode_bytes": probe["peak_mem_decode_bytes"], "decode_steps": probe["probe_decode_steps"],
    }


# Kernel-name patterns of the --profile breakdown, first match wins (lower-cased names; on CPU, aten op names)
PROFILE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"decode_split|decode_combine|prefill|flash|fmha|attn|sdpa"),
    ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("norm", r"norm|rsqrt"),
    ("kv write / copy", r"copy|index_put|index_copy|scatter|append|aten::cat"),
    ("elementwise / reduce", r"elementwise|vectorized|unrolled|reduce|silu|rope|aten::(mul|add|neg|pow|mean|silu|argmax)"),
)


class _ProfileMonitor:
    """Engine monitor that runs torch.profiler over decode steps ``skip .. skip + steps - 1``."""

    def __init__(self, skip: int, steps: int, device: torch.device):
        self.skip, self.steps, self.device, self.n, self.prof, self.running = skip, steps, device, 0, None, False
        self.step_ms: list[float] = []

    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0):
        yield

    @contextlib.contextmanager
    def decode_step(self):
        from torch.profiler import ProfilerActivity, profile

        if self.n == self.skip:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.running = True
        with CudaTimer(self.device) as t:
            yield
        if self.skip <= self.n < self.skip + self.steps:
            self.step_ms.append(t.ms)
        self.n += 1
        if self.n == self.skip + self.steps:
            self.finish()

    def finish(self) -> None:
        if self.running:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.__exit__(None, None, None)
            self.running = False


def kernel_breakdown(prof: Any, steps: int, on_gpu: bool) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """(ms per step by category, top kernels as (name, ms per step, calls per step)) from a finished profile:
    device kernels on a GPU, self CPU time of aten ops on CPU."""
    import re

    from torch.autograd import DeviceType

    per: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if on_gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            per[e.key] = [us / 1000 / steps, e.count / steps]
    cats: dict[str, float] = {}
    for name, (ms, _) in per.items():
        low = name.lower()
        cat = next((c for c, pat in PROFILE_CATEGORIES if re.search(pat, low)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    top = sorted(((n, v[0], v[1]) for n, v in per.items()), key=lambda x: -x[1])[:12]
    return cats, top


def profile_kvbench(model: Any, B: int, S: int, args: argparse.Namespace, spec: MethodSpec | None = None
                    ) -> dict[str, Any]:
    """Where a kvbench decode step's time goes (``full``, or the method of ``spec``): torch.profiler over
    ``args.profile`` steps (after 3), with the CUDA graph when it captures (kernels inside a graph replay are
    traced by CUPTI), else eagerly."""
    from harness.engine import Engine, Prompt
    from methods.full import Full

    dev = next(model.parameters()).device
    ids = random_ids(B, S, model.config.vocab_size, args.seed, torch.device("cpu"))
    for want_graph in (True, False):  # eagerly when the graph replay's kernels were not traced
        mon = _ProfileMonitor(skip=3, steps=args.profile, device=dev)
        method = Full() if spec is None else spec.build(model)[0]
        engine = Engine(model, method, prefill_chunk=chunk_for(B, args), monitor=mon, cuda_graph=want_graph)
        # the first new token comes from the prefill's logits: 3 + N decode steps need 4 + N new tokens
        engine.generate([Prompt(context=row.tolist()) for row in ids], max_new_tokens=4 + args.profile)
        mon.finish()
        if mon.prof is None or not mon.step_ms:
            raise RuntimeError(f"no decode step was profiled ({mon.n} steps ran)")
        cats, top = kernel_breakdown(mon.prof, len(mon.step_ms), dev.type == "cuda")
        graph = want_graph and engine.graph_error is None and dev.type == "cuda"
        if cats or not graph:
            break
    return {"kind": "profile", "batch": B, "context": S, "label": spec.label if spec else "full",
            "cuda_graph": graph, "steps": len(mon.step_ms),
            "step_ms_p50": pcts(mon.step_ms)[0], "busy_ms": sum(cats.values()), "categories": cats, "top": top}


def _hf_prefill(model: Any, ids: torch.Tensor, cache: Any, chunk: int, static: bool) -> torch.Tensor:
    """Chunked prefill into ``cache``; returns the last token's logits (B, V)."""
    B, S = ids.shape
    logits = None
    for s in range(0, S, chunk):
        e = min(S, s + chunk)
        kw = {"cache_position": torch.arange(s, e, device=ids.device)} if static else {}
        out = model(input_ids=ids[:, s:e], past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
        logits = out.logits[:, -1]
    return logits


def run_hf(model: Any, B: int, S: int, args: argparse.Namespace, *, static: bool) -> dict[str, Any]:
    from transformers import DynamicCache, StaticCache

    from harness.measure import PeakMemory

    dev = next(model.parameters()).device
    devs = tuple({p.device: 0 for p in model.parameters()})  # every GPU of a --split model: peaks summed
    model.set_attn_implementation("sdpa")
    ids = random_ids(B, S, model.config.vocab_size, args.seed, dev)
    n = args.steps + args.warmup
    cache = StaticCache(config=model.config, max_cache_len=S + n + 1) if static else DynamicCache(config=model.config)
    with torch.inference_mode(), PeakMemory(devs) as pm_prefill:
        t0 = time.perf_counter()
        logits = _hf_prefill(model, ids, cache, chunk_for(B, args), static)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prefill_s = time.perf_counter() - t0
    step_fn = model.forward
    if static and not args.no_compile:
        step_fn = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    tok = logits.argmax(-1, keepdim=True)  # (B, 1)
    pos = S
    times = []
    compile_s = 0.0
    with torch.inference_mode(), PeakMemory(devs) as pm_decode:
        for i in range(n):
            kw = {"cache_position": torch.tensor([pos], device=dev)} if static else {}
            t0 = time.perf_counter()
            with CudaTimer(dev) as t:
                out = step_fn(input_ids=tok, past_key_values=cache, use_cache=True, **kw)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            if i < args.warmup:
                compile_s += time.perf_counter() - t0
            else:
                times.append(t.ms)
            pos += 1
    p50, p90 = pcts(times)
    return {"kernel": "sdpa", "cuda_graph": bool(static and not args.no_compile and dev.type == "cuda"),
            "decode_ms_p50": p50, "decode_ms_p90": p90, "prefill_tok_s": B * S / prefill_s,
            "peak_mem_prefill_bytes": pm_prefill.peak, "peak_mem_decode_bytes": pm_decode.peak, "decode_steps": len(times),
            "warmup_s": round(compile_s, 1)}


def capacity_probe(model: Any, S: int, args: argparse.Namespace) -> dict[str, Any]:
    """Largest batch of kvbench ``full`` whose decode fits ``BUDGET_80GB`` at context S (random K/V)."""
    from harness.engine import Engine
    from methods.full import Full

    dev = next(model.parameters()).device
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, BUDGET_80GB / total), dev)
    engine = Engine(model, Full())

    def fits(B: int) -> bool:
        state = None
        try:
            state = engine.new_state(B, S + 8)
            for layer in state.layers:  # random K/V in place of a prefill (same bytes, same decode reads)
                layer.k[:, :, :S].normal_()
                layer.v[:, :, :S].normal_()
                layer.lengths.fill_(S)
                layer.seen.fill_(S)
                layer.hi = S
            step = engine._decode_step(state, B)
            tok = torch.ones(B, dtype=torch.long, device=dev)
            valid = torch.ones(B, dtype=torch.bool, device=dev)
            for i in range(4):
                step(tok, torch.full((B,), S + i, device=dev), valid)
            torch.cuda.synchronize(dev)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del state
            torch.cuda.empty_cache()

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    torch.cuda.set_per_process_memory_fraction(1.0, dev)
    per_seq = S * kv_bytes_per_token(model.config)
    return {"context": S, "max_batch": lo, "kv_bytes_per_seq": per_seq,
            "kv_bytes_at_max": lo * per_seq, "budget_bytes": BUDGET_80GB}


# --------------------------------------------------------------------------------------------------
# Report


def fmt_gb(x: Any) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def row_commits(rows: list[dict], commit: str) -> str:
    """Where measured rows carry other commits than the report's (merged by hand), say which rows."""
    other: dict[str, set[str]] = {}
    for r in rows:
        if r.get("kind") == "cell" and r.get("commit") not in (None, commit):
            other.setdefault(r["commit"], set()).add(r["engine"])
    return "".join(f" ({', '.join(sorted(e))} rows measured at {c})" for c, e in sorted(other.items()))


def kernel_label(r: dict) -> str:
    """The report's kernel column: the attention path, and for kvbench whether the decode step ran the fused
    layers (harness/fused_decoder.py) or the Hugging Face modules."""
    return r.get("kernel", "") + (f" + {r['layers']} layers" if r.get("layers") else "")


ROOFLINE_TARGET = {(1, 32768): 0.80, (8, 32768): 0.80, (1, 131072): 0.80}  # issue 9's cells and bar
SPEEDUP_CELL, SPEEDUP_TARGET = (8, 32768), 3.0  # x hf_static_compile tokens/s, where that is below 0.27
MEMORY_SLACK = 2e9  # peak <= weights + KV capacity + 2 GB


def targets(rows: list[dict], meta: dict) -> list[str]:
    """The report's check of the targets: roofline fraction of kvbench at the target cells, its speed-up over
    HF StaticCache + compile, and its peak memory against weights + KV capacity + 2 GB at every cell."""
    ok = {(r["engine"], r["batch"], r["context"]): r for r in rows if r.get("kind") == "cell" and r.get("status") == "ok"
          and r.get("label", "full") == "full"}
    out = ["", "Targets (kvbench `full`):", ""]
    for (B, S), bar in ROOFLINE_TARGET.items():
        r = ok.get(("kvbench", B, S))
        got = "not measured" if r is None else f"{r['roofline_frac']:.2f}"
        met = "" if r is None else ("met" if r["roofline_frac"] >= bar else "missed")
        out.append(f"- roofline_frac >= {bar:.2f} at {B} x {S}: {got} {met}".rstrip())
    k, h = ok.get(("kvbench", *SPEEDUP_CELL)), ok.get(("hf_static_compile", *SPEEDUP_CELL))
    if k and h:
        x = k["tokens_s"] / h["tokens_s"]
        cond = "applies" if h["roofline_frac"] < 0.27 else "does not apply"
        out.append(f"- >= {SPEEDUP_TARGET:g}x HF StaticCache + compile tokens/s at {SPEEDUP_CELL[0]} x {SPEEDUP_CELL[1]} "
                   f"(HF at {h['roofline_frac']:.2f} of roofline: the target {cond}): {x:.2f}x "
                   f"{'met' if x >= SPEEDUP_TARGET else 'missed'}")
    for (e, B, S), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if e != "kvbench" or r.get("peak_mem_prefill_bytes") is None:
            continue
        cap = B * (S + int(r.get("decode_steps", 0)) + 1) * meta["kv_bytes_per_token"]
        bound = meta["weight_bytes"] + cap + MEMORY_SLACK
        peak = max(r["peak_mem_prefill_bytes"], r.get("peak_mem_decode_bytes") or 0)
        out.append(f"- peak memory at {B} x {S}: {peak / 1e9:.2f} GB <= weights {meta['weight_bytes'] / 1e9:.2f} + KV "
                   f"capacity {cap / 1e9:.2f} + 2 GB = {bound / 1e9:.2f} GB: {'met' if peak <= bound else 'missed'}")
    return out


# issue 20's bars for the quantizers (8 x 32768, same call as full): decode ms <= x * full's, and >= 0.80 of the
# method's own roofline for the INT4 ones; at 1 x 32768 no quantizer slower than 1.10 x full
METHOD_TARGETS = {("uniform_int", 0.75): 0.62, ("kivi", 0.75): 0.62, ("quarot", 0.75): 0.62, ("ratequant", 0.75): 0.62,
                  ("fp8", 0.5): 0.76, ("turboquant_kqv", 0.75): 0.70}
INT4 = ("uniform_int", "kivi", "quarot", "ratequant")
METHOD_CELL, WEIGHTS_CELL, WEIGHTS_BAR, METHOD_ROOFLINE = (8, 32768), (1, 32768), 1.10, 0.80


def method_rows(rows: list[dict]) -> list[dict]:
    """kvbench rows of --methods calls (they carry a call id), each with ``x_full``: its decode ms over the ms of
    ``full`` in the same call and cell (None where that call measured no full)."""
    cells = [r for r in rows if r.get("kind") == "cell" and r.get("engine") == "kvbench" and r.get("call")]
    if not any(r.get("label", "full") != "full" for r in cells):
        return []
    full = {(r["call"], r["batch"], r["context"]): r for r in cells if r.get("method") == "full" and r.get("status") == "ok"}
    out = []
    for r in cells:
        f = full.get((r["call"], r["batch"], r["context"]))
        x = r["decode_ms_p50"] / f["decode_ms_p50"] if f and r.get("status") == "ok" else None
        out.append({**r, "x_full": x})
    return sorted(out, key=lambda r: (r["batch"], r["context"], r.get("method") != "full", r.get("label", "")))


def method_targets(mrows: list[dict]) -> list[str]:
    out = ["", f"Targets (quantizers, same call as full; {METHOD_CELL[0]} x {METHOD_CELL[1]} unless named):", ""]
    ok = [r for r in mrows if r.get("status") == "ok" and r.get("x_full") is not None]
    for (name, ratio), bar in METHOD_TARGETS.items():
        for r in (r for r in ok if (r["batch"], r["context"]) == METHOD_CELL and r.get("method") == name
                  and abs(float(r.get("ratio", -1)) - ratio) < 1e-9):
            line = f"- {r['label']}: {r['x_full']:.2f} x full (bar {bar:.2f}) {'met' if r['x_full'] <= bar else 'missed'}"
            if name in INT4:
                f = r["roofline_frac"]
                line += f"; {f:.2f} of its roofline (bar {METHOD_ROOFLINE:.2f}) {'met' if f >= METHOD_ROOFLINE else 'missed'}"
            out.append(line)
    for r in (r for r in ok if (r["batch"], r["context"]) == WEIGHTS_CELL and r.get("family") == "quantization"):
        out.append(f"- {r['label']} at {WEIGHTS_CELL[0]} x {WEIGHTS_CELL[1]}: {r['x_full']:.2f} x full (bar "
                   f"{WEIGHTS_BAR:.2f}) {'met' if r['x_full'] <= WEIGHTS_BAR else 'missed'}")
    return out if len(out) > 3 else []


def methods_table(mrows: list[dict]) -> list[str]:
    lines = ["", "Methods (`--methods`; kvbench rows; KV read = bytes one decode step reads, measured by the store; "
             "roofline = (weights read + KV read) / copy bandwidth; x full = decode ms over full's in the same call):",
             "", "| batch | context | method | ratio | kernel | graph | decode ms p50 | x full | KV read GB | roofline ms "
             "| roofline frac | prefill tok/s | peak prefill GB | peak decode GB | calibrate ms | note |",
             "|---:|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in mrows:
        head = f"| {r['batch']} | {r['context']} | {r.get('label', 'full')} | {float(r.get('ratio') or 0):g} "
        if r.get("status") != "ok":
            lines.append(head + "| | | | | | | | | | | | " + f"{r['status']}: {r.get('reason', '')} |")
            continue
        x = "-" if r.get("x_full") is None else f"{r['x_full']:.2f}"
        cal = "" if r.get("calibrate_ms") is None else f"{r['calibrate_ms']:,.0f}"
        read = r.get("kv_bytes_read_per_step")
        lines.append(head + f"| {kernel_label(r)} | {'yes' if r.get('cuda_graph') else 'no'} | {r['decode_ms_p50']:.2f} "
                     f"| {x} | {fmt_gb(read)} | {r['roofline_ms']:.2f} | {r['roofline_frac']:.2f} "
                     f"| {r['prefill_tok_s']:,.0f} | {fmt_gb(r.get('peak_mem_prefill_bytes'))} "
                     f"| {fmt_gb(r.get('peak_mem_decode_bytes'))} | {cal} | {r.get('note', '')} |")
    return lines


def write_report(rows: list[dict], path: Path, meta: dict) -> str:
    mrows = method_rows(rows)
    rows = [r for r in rows if r.get("kind") != "cell" or r.get("label", "full") == "full"]  # the engines table
    cells = sorted({(r["batch"], r["context"]) for r in rows if r.get("kind") == "cell"}, key=lambda c: (c[0], c[1]))
    lines = [
        f"# Decode benchmark: kvbench `full` vs Hugging Face, {meta['model']}, {meta['device']}",
        "",
        f"Commit {meta['commit']}{row_commits(rows, meta['commit'])}, {meta['date']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}; copy "
        f"bandwidth {meta['bandwidth'] / 1e12:.2f} TB/s (measured in-process); weights read per step "
        f"{meta['weight_bytes_read'] / 1e9:.2f} GB; KV {meta['kv_bytes_per_token'] / 1024:.0f} KiB per token.",
        "",
        "Commands (one per GPU call; rows merged):",
        "",
        *[f"    {c}" for c in meta["commands"]],
        "",
        "| batch | context | engine | kernel | graph | decode ms p50 | p90 | tokens/s | roofline ms | roofline frac "
        "| prefill tok/s | peak prefill GB | peak decode GB | note |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    order = {e: i for i, e in enumerate(ENGINES + EXTRA_ENGINES)}
    for B, S in cells:
        for r in sorted((r for r in rows if r.get("kind") == "cell" and (r["batch"], r["context"]) == (B, S)),
                        key=lambda r: order.get(r["engine"], 9)):
            if r.get("status") != "ok":
                lines.append(f"| {B} | {S} | {r['engine']} | | | | | | | | | | | {r['status']}: {r.get('reason', '')} |")
                continue
            lines.append(
                f"| {B} | {S} | {r['engine']} | {kernel_label(r)} | {'yes' if r.get('cuda_graph') else 'no'} "
                f"| {r['decode_ms_p50']:.2f} | {r['decode_ms_p90']:.2f} | {r['tokens_s']:,.0f} | {r['roofline_ms']:.2f} "
                f"| {r['roofline_frac']:.2f} | {r['prefill_tok_s']:,.0f} | {fmt_gb(r.get('peak_mem_prefill_bytes'))} "
                f"| {fmt_gb(r.get('peak_mem_decode_bytes'))} | {r.get('note', '')} |")
    for r in rows:
        if r.get("kind") == "skipped_cell":
            lines.append(f"| {r['batch']} | {r['context']} | all | | | | | | | | | | | skipped: {r['reason']} |")
    lines += targets(rows, meta)
    if mrows:
        lines += methods_table(mrows) + method_targets(mrows)
    cals = [r for r in rows if r.get("kind") == "calibration"]
    if cals:
        lines += ["", "Calibration (`--calibrate`: the method's fit on random token ids, uncached):", ""]
        for c in cals:
            t = c.get("timing_ms") or {}
            parts = ", ".join(f"{k} {v:,.0f}" for k, v in t.items())
            cold = f"; first call {c['calibrate_cold_ms']:,.0f} ms" if c.get("calibrate_cold_ms") else ""
            lines.append(f"- {c['label']}: " + (f"failed: {c['error']}" if "error" in c else
                                               f"{c['calibrate_ms']:,.0f} ms" + (f" ({parts})" if parts else "")
                                               + cold))
    caps = [r for r in rows if r.get("kind") == "capacity"]
    if caps:
        lines += ["", "Capacity (kvbench `full`, random K/V, 80 GB budget):", ""]
        for c in caps:
            lines.append(f"- context {c['context']}: largest batch {c['max_batch']} "
                         f"(KV {c['kv_bytes_at_max'] / 1e9:.1f} GB + weights in {c['budget_bytes'] / 1e9:.0f} GB)")
    profs = sorted((r for r in rows if r.get("kind") == "profile"),
                   key=lambda r: (r["batch"], r["context"], r.get("label", "full")))
    if profs:
        cats = [c for c, _ in PROFILE_CATEGORIES] + ["other"]
        lines += ["", "Where a kvbench `full` decode step goes (`--profile`: torch.profiler over the steps, kernel time "
                  "per step in ms; busy = the kernels' sum, the rest of the step is launch gaps and idle):", "",
                  "| batch | context | method | graph | step ms | busy ms | " + " | ".join(cats)
                  + " | top kernels (ms, calls) |",
                  "|---:|---:|---|---|---:|---:|" + "---:|" * len(cats) + "---|"]
        for r in profs:
            label = r.get("label", "full")
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['context']} | {label} | | | | " + "| " * len(cats)
                             + f"failed: {r['error']} |")
                continue
            top = "; ".join(f"`{n[:48]}` {ms:.2f} ({calls:g})" for n, ms, calls in r["top"][:4])
            lines.append(f"| {r['batch']} | {r['context']} | {label} | {'yes' if r['cuda_graph'] else 'no'} | "
                         f"{r['step_ms_p50']:.2f} | {r['busy_ms']:.2f} | "
                         + " | ".join(f"{r['categories'].get(c, 0.0):.2f}" for c in cats) + f" | {top} |")
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3_8b_shape", help="a conf/model name")
    ap.add_argument("--cells", default=CELLS, help="batch x context, comma-separated")
    ap.add_argument("--engines", default=None, help=f"comma-separated, from {', '.join(ENGINES + EXTRA_ENGINES)} "
                    "(default: all of ENGINES; only kvbench with --methods)")
    ap.add_argument("--methods", default=None,
                    help="kvbench rows for these methods instead of full alone: name[:ratio[:key=value...]], "
                         "comma-separated, any conf/method name (e.g. full,fp8:0.5,uniform_int:0.75)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (compilation)")
    ap.add_argument("--prefill-tokens", type=int, default=8192,
                    help="tokens per prefill forward pass over the whole batch (chunk = this / batch, >= 256): "
                         "bounds prefill activations, so peak memory stays near weights + KV")
    ap.add_argument("--capacity", action="store_true", help="also find the largest batch at 32K in 80 GB")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile N kvbench decode steps per cell (torch.profiler): time by kernel category")
    ap.add_argument("--calibrate", default=None,
                    help="method specs whose calibration (RateQuant's fit) is timed first, on random token ids, "
                         "uncached (same syntax as --methods)")
    ap.add_argument("--profile-methods", default=None,
                    help="with --methods: profile only these method specs (comma-separated labels)")
    ap.add_argument("--no-compile", action="store_true", help="hf_static_compile without torch.compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(REPO / "results" / "bench"))
    ap.add_argument("--report", action="store_true", help="only rebuild the report from this commit's rows (any machine: the model is built on the meta device)")
    ap.add_argument("--commit", default=None,
                    help="label the rows and the report with this commit instead of `git rev-parse` (the GPU "
                         "machine's copy of the tree can report the session's first commit + dirty)")
    ap.add_argument("--split", default=None, metavar="all|K",
                    help="split the model's layers over all (or the first K) GPUs (accelerate device_map, "
                         "harness/devices.py): a model larger than one GPU; roofline over the GPUs in turn")
    ap.add_argument("--smoke", action="store_true", help="CPU, a tiny random Llama, 1x64 and 2x48: seconds")
    args = ap.parse_args(argv)

    from harness.loading import load
    from harness.measure import copy_bandwidth, weights_bytes

    specs = [MethodSpec(m) for m in (args.methods or "").split(",") if m]
    engines = [e for e in (args.engines or ("kvbench" if specs else ",".join(ENGINES))).split(",") if e]
    bad = [e for e in engines if e not in ENGINES + EXTRA_ENGINES]
    if bad:
        raise SystemExit(f"unknown engine(s) {bad}; choose from {', '.join(ENGINES + EXTRA_ENGINES)}")
    cells = parse_cells(args.cells)
    if args.smoke:
        from harness.models import build_random_model, tiny_config

        model = build_random_model(tiny_config("llama", n_layers=2), seed=0)
        device_name, cells = "cpu-smoke", [(1, 64), (2, 48)]
        args.steps, args.warmup, args.prefill_tokens, args.no_compile = 4, 1, 64, True
        bw = None
    elif args.report and not torch.cuda.is_available():  # merge rows anywhere: the model's shapes suffice
        model = meta_model(args.model)
        commit = args.commit or git_commit()
        found = sorted((Path(args.out_dir) / "rows").glob(f"*-{commit}.jsonl"))
        if len(found) != 1:
            raise SystemExit(f"--report without a GPU needs exactly one rows file for commit {commit} in "
                             f"{args.out_dir}/rows, found {[f.name for f in found]}; pass --commit")
        device_name, bw = found[0].name[: -len(f"-{commit}.jsonl")], None
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.py measures GPU decode: run it on the GPU machine (or --smoke on CPU)")
        import yaml

        cfg = yaml.safe_load((REPO / "conf" / "model" / f"{args.model}.yaml").read_text())
        split = int(args.split) if str(args.split).isdigit() else args.split
        model = load(cfg, device="cuda", split_over=split).model
        device_name = torch.cuda.get_device_name(0).replace(" ", "-").lower()
        bw = copy_bandwidth(torch.device("cuda"), nbytes=4 << 30)
        if args.split:  # per-GPU bandwidths; the report's figure is their sum
            from harness.devices import device_bandwidths

            bws = device_bandwidths(model, nbytes=4 << 30)
            device_name, bw = f"{device_name}-x{len(bws)}", sum(bws.values())
    dev = next(model.parameters()).device
    commit = args.commit or git_commit()
    out_dir = Path(args.out_dir)
    rows_path = out_dir / "rows" / f"{device_name}-{commit}.jsonl"
    command = "python -m scripts.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    w_read = weight_bytes_read(model)
    kv_tok = kv_bytes_per_token(model.config)
    call_id = dt.datetime.now().isoformat(timespec="seconds")  # rows of one call compare with each other

    if not args.report:
        rows_path.parent.mkdir(parents=True, exist_ok=True)
        with rows_path.open("a") as f:
            import transformers

            f.write(json.dumps({"kind": "command", "command": command, "bandwidth": bw,
                                "date": dt.date.today().isoformat(), "torch": torch.__version__,
                                "transformers": transformers.__version__}) + "\n")
        free = sum(torch.cuda.get_device_properties(d).total_memory for d in {p.device for p in model.parameters()}
                   ) if dev.type == "cuda" else None
        for spec in [MethodSpec(m) for m in (args.calibrate or "").split(",") if m]:
            row = {"kind": "calibration", "label": spec.label, "method": spec.name, "commit": commit}
            try:  # twice: the first call also pays one-off costs (the engine's kernels compile), the second not
                method, cold = spec.build(model)
                method, ms = spec.build(model)
                row.update(calibrate_ms=ms, calibrate_cold_ms=cold, timing_ms=getattr(method, "fit", {}).get("timing_ms"))
            except Exception as e:  # noqa: BLE001
                row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            print(json.dumps(row, default=str), flush=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        for B, S in cells + ([] if args.smoke else parse_cells(TOO_BIG)):
            kv = B * S * kv_tok
            if free is not None and kv + w_read > free:
                skip = {"kind": "skipped_cell", "batch": B, "context": S,
                        "reason": f"KV alone {kv / 2**30:.0f} GiB + weights exceed the device's {free / 2**30:.0f} GiB"}
                with rows_path.open("a") as f:
                    f.write(json.dumps(skip) + "\n")
                continue
            if (B, S) not in cells:
                continue
            jobs = [(e, sp) for e in engines for sp in (specs if e == "kvbench" and specs else [None])]
            for engine, spec in jobs:
                row: dict[str, Any] = {"kind": "cell", "engine": engine, "batch": B, "context": S, "commit": commit,
                                       "call": call_id, "method": spec.name if spec else "full",
                                       "ratio": (spec.ratio if spec and spec.ratio is not None else 0.0),
                                       "label": spec.label if spec else "full"}
                t0 = time.perf_counter()
                try:
                    if engine in ("kvbench", "kvbench_modules"):
                        method, calib_ms = spec.build(model) if spec else (None, None)
                        if method is not None:
                            row.update(family=method.family, ratio=float(method.ratio), calibrate_ms=calib_ms)
                        row.update(run_kvbench(model, B, S, args, "off" if engine == "kvbench_modules" else "auto",
                                               method=method))
                    else:
                        row.update(run_hf(model, B, S, args, static=engine == "hf_static_compile"))
                    row["status"] = "ok"
                    row["tokens_s"] = B / (row["decode_ms_p50"] / 1000)
                    read = row.get("kv_bytes_read_per_step") if spec else None
                    kv_read = kv if read is None else read
                    if args.split and bw:  # GPUs in turn; tp_roofline_ms: all at once (harness/devices.py)
                        from harness.devices import roofline_ms

                        row.update(roofline_ms(model, kv_bytes=kv_read, skip_input_embedding=True, bandwidths=bws))
                        row["note"] = (f"layers over {row['n_devices']} GPUs; tensor-parallel bound "
                                       f"{row['tp_roofline_ms']:.2f} ms; {row.get('graph_error') or ''}").rstrip("; ")
                    elif bw:
                        row["roofline_ms"] = 1000 * (w_read + kv_read) / bw
                    else:  # CPU smoke: no bandwidth, no roofline
                        row["roofline_ms"] = float("nan")
                    row["roofline_frac"] = row["roofline_ms"] / row["decode_ms_p50"]
                except torch.OutOfMemoryError as e:
                    row.update(status="skipped", reason=f"out of memory: {str(e).splitlines()[0][:160]}")
                except ValueError as e:  # a method that cannot run here (validate's reasons) still writes its row
                    row.update(status="skipped", reason=str(e).splitlines()[0][:300])
                except Exception as e:  # noqa: BLE001 - a failed engine still writes its row
                    row.update(status="failed", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                print(json.dumps({k: v for k, v in row.items() if k != "kind"}, default=str), flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                with rows_path.open("a") as f:  # after every cell: a call cut short keeps what it measured
                    f.write(json.dumps(row, default=str) + "\n")
            for spec in ([s for s in specs if s.label in args.profile_methods.split(",")] if args.profile_methods
                         else specs or [None]) if args.profile and "kvbench" in engines else []:
                try:
                    prof = profile_kvbench(model, B, S, args, spec)
                except Exception as e:  # noqa: BLE001 - a failed profile still writes its row
                    prof = {"kind": "profile", "batch": B, "context": S, "label": spec.label if spec else "full",
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(json.dumps(prof, default=str), flush=True)
                with rows_path.open("a") as f:
                    f.write(json.dumps(prof, default=str) + "\n")
        if args.capacity and dev.type == "cuda" and not args.split:
            cap = {"kind": "capacity", **capacity_probe(model, 32768, args)}
            print(json.dumps(cap), flush=True)
            with rows_path.open("a") as f:
                f.write(json.dumps(cap) + "\n")
    rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()] if rows_path.exists() else []
    cmds = [r for r in rows if r.get("kind") == "command"]
    latest: dict[tuple, dict] = {}
    for r in rows:  # the latest row per (engine, method spec, cell) wins
        if r.get("kind") == "cell":
            latest[(r["engine"], r.get("label", "full"), r["batch"], r["context"])] = r
        elif r.get("kind") == "skipped_cell":
            latest[("skipped", r["batch"], r["context"])] = r
        elif r.get("kind") == "capacity":
            latest[("capacity", r["context"])] = r
        elif r.get("kind") == "calibration":
            latest[("calibration", r["label"])] = r
        elif r.get("kind") == "profile":
            latest[("profile", r.get("label", "full"), r["batch"], r["context"])] = r
    import transformers

    bandwidths = [c["bandwidth"] for c in cmds if c.get("bandwidth")]
    def versions(key: str, here: str) -> str:  # as the GPU calls recorded them (--report may run elsewhere)
        return ", ".join(sorted({c[key] for c in cmds if c.get(key)})) or here

    meta = {"model": "tiny random Llama (smoke)" if args.smoke else args.model, "device": device_name, "commit": commit,
            "date": dt.date.today().isoformat(), "torch": versions("torch", torch.__version__),
            "transformers": versions("transformers", transformers.__version__),
            "bandwidth": statistics.median(bandwidths) if bandwidths else math.nan,
            "weight_bytes_read": w_read, "kv_bytes_per_token": kv_tok, "weight_bytes": weights_bytes(model),
            "commands": [c["command"] for c in cmds] or [command]}
    report = out_dir / f"{device_name}-{meta['date']}-{commit}.md"
    print(write_report(list(latest.values()), report, meta))
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
