"""The engines of the decode benchmark: each returns the measured columns of one cell (kvbench through the
runner's throughput probe, Hugging Face eager and StaticCache + compile), and the capacity probe."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from scripts.bench.common import BUDGET_80GB, CudaTimer, chunk_for, kv_bytes_per_token, pcts, random_ids


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
