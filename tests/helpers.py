"""Shared test utilities."""

from __future__ import annotations

import copy

import torch

from harness.engine import Engine, Prompt


def random_prompts(lengths, *, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(model, method, prompts, *, n_new=8, chunk=None, questions=None, protocol="query_agnostic"):
    """Run prompts as one batch through a private copy of ``model``."""
    engine = Engine(copy.deepcopy(model), method, prefill_chunk=chunk)
    qs = questions or [()] * len(prompts)
    return engine.generate(
        [Prompt(context=p, question=q) for p, q in zip(prompts, qs)],
        max_new_tokens=n_new,
        return_logits=True,
        protocol=protocol,
    )


def prefill(model, method, prompts, chunk=8, extra=16):
    """Prefill ``prompts`` (one batch) into a fresh state with room for ``extra`` more tokens per row;
    returns (engine, state) before ``end_of_context``."""
    engine = Engine(copy.deepcopy(model), method, prefill_chunk=chunk)
    state = engine.new_state(len(prompts), max(map(len, prompts)) + extra)
    engine.run_segment(state, prompts, [0] * len(prompts), chunk=chunk, want_last=[False] * len(prompts),
                       last_logits=None)
    return engine, state


def read_wandb_offline(path):
    """Records of an offline W&B run file (``run-*.wandb``): a 7-byte header, then LevelDB-log
    framed protobuf records in 32 KiB blocks. Returns (summary dict, config keys, record kinds)."""
    import json
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            records.append(buf)
            buf = b""
    summary, config, kinds = {}, set(), []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "summary":
            for item in rec.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            config.update(item.key for item in rec.config.update)
        elif kind == "run":
            config.update(item.key for item in rec.run.config.update)
    return summary, config, kinds


def random_qa_prompts(lengths, *, q_len: int, seed: int = 0, vocab: int = 250) -> list[Prompt]:
    """Prompts of random token ids in [3, vocab): contexts of ``lengths`` tokens and questions of ``q_len``."""
    g = torch.Generator().manual_seed(seed)
    return [Prompt(context=torch.randint(3, vocab, (n,), generator=g).tolist(),
                   question=torch.randint(3, vocab, (q_len,), generator=g).tolist()) for n in lengths]


# 16 prompts for the GPU end-to-end tests: 8 equal and 8 ragged lengths (one row shorter than a prefill chunk)
GPU_LENGTHS = [300] * 8 + [300, 170, 233, 64, 129, 300, 31, 250]


def gpu_tiny_model(dtype: str):
    """The embedded trained tiny model on the GPU in ``dtype`` ("float32" / "bfloat16")."""
    from harness.loading import load

    return load({"path": "models/kvbench-tiny", "dtype": dtype}, device="cuda").model


def logits_error_until_divergence(ref, fast) -> float:
    """Largest relative logit difference (over each row's largest |logit|) between two generations, taken per
    row over the steps up to and including the first step whose greedy tokens differ: after that the two rows
    continue from different tokens and their logits are not comparable. In bf16 a near-tie can flip a token
    (the fused kernels dequantize in fp32 where the reference rounds K/V to bf16); the count of rows with
    identical tokens is asserted beside this."""
    worst = 0.0
    for a, b, ta, tb in zip(ref.logits, fast.logits, ref.tokens, fast.tokens):
        n = min(len(a), len(b))
        first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), n - 1)
        n = min(n, first + 1)
        worst = max(worst, float((a[:n] - b[:n]).abs().max() / a[:n].abs().max()))
    return worst


def divergences_not_near_ties(ref, fast, tol: float) -> list[str]:
    """Rows whose greedy tokens part ways where the reference did *not* have a near tie: at the first step the
    tokens differ, the reference's logit for its own token minus its logit for the other path's token, over the
    row's largest |logit|, must be within ``tol`` (the logit noise the caller allows). A real bug changes the
    ranking by more; rounding noise only flips near ties. Returns a description of each offending row."""
    bad = []
    for r, (a, ta, tb) in enumerate(zip(ref.logits, ref.tokens, fast.tokens)):
        i = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        if i is None or i >= len(a):
            continue
        gap = float((a[i, ta[i]] - a[i, tb[i]]) / a[: i + 1].abs().max())
        if gap > tol:
            bad.append(f"row {r} step {i}: tokens {ta[i]} vs {tb[i]}, reference gap {gap:.3g} > {tol}")
    return bad


def graph_steps_without_sync(engine, state, *, start: int, steps: int = 3, batch: int = 2) -> None:
    """Capture ``engine``'s decode step for ``state`` (a CUDA device) and run ``steps`` steps of ``batch`` rows
    from position ``start`` under CUDA sync-debug "error" (a host synchronisation inside a step raises), then
    finish the graph. Callers assert on the state's counters afterwards."""
    step = engine._decode_step(state, batch)
    tok = torch.arange(1, batch + 1, device="cuda")
    pos = torch.full((batch,), start, device="cuda")
    valid = torch.ones(batch, dtype=torch.bool, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(steps):
            step(tok, pos + i, valid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    step.finish()
