"""RateQuant over bases whose stores are not CodecStores (KIVI's packed codes and rings; TurboQuant, whose kernel
serves whole layers): :class:`methods.ratequant.GroupedStore` holds one base store per (K width, V width) pair and
runs the base's fused kernels per group. Against the reference (one store per head): on CPU under Triton's
interpreter (fp32, small shapes), and on the GPU (``gpu`` marker: the CUDA graph, no host sync)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

from harness.engine import Engine, Prompt  # noqa: E402
from methods.api import LayerSpec  # noqa: E402
from methods.ratequant import GroupedStore, RateQuant  # noqa: E402
from tests.helpers import GPU_LENGTHS, divergences_not_near_ties, gpu_tiny_model, random_qa_prompts  # noqa: E402

KIVI_SMALL = {"group_size": 16, "residual_length": 32}  # head_dim 32: the smallest shape the KIVI kernels serve


def _method(base, fused, bits, L, H, params=None):
    m = RateQuant(ratio=0.75, base=base, base_params=dict(params or {}), fused=fused, allocation="uniform")
    m.set_bits(torch.tensor(bits), L, H)  # (K widths by layer and head, then V widths)
    return m


def _steps(stores, steps, *, H_q, H_kv, D, seed, tol):
    """Run the same random q/k/v chunks through every store; valid rows' outputs and the counters agree."""
    g = torch.Generator().manual_seed(seed)
    for T, valid in steps:
        q = torch.randn(2, H_q, T, D, generator=g)
        k, v = torch.randn(2, 2, H_kv, T, D, generator=g)
        valid = torch.tensor(valid)
        pos = torch.zeros(2, T, dtype=torch.long)
        outs = {f: st.extend(q, k, v, positions=pos, valid=valid, scaling=D**-0.5) for f, st in stores.items()}
        rows = valid[:, 0]
        torch.testing.assert_close(outs["on"][rows], outs["off"][rows], atol=tol, rtol=tol)
        for st in stores["on"].groups:
            assert torch.equal(st.lengths, stores["off"].groups[0].lengths) and st.hi == stores["off"].groups[0].hi


def test_ratequant_over_kivi_groups_heads_by_width(interpret):
    """One layer, 4 kv heads at widths (K, V) = (2, 8), (4, 4), (4, 4), (3, 5): the fused store is three KIVI stores
    (the two (4, 4) heads in one), fused and graph-safe; the reference one store per head. A ragged prefill chunk,
    then decode steps through a key window filling (slots 30 .. 33) with a row finishing: outputs to 1e-5, the
    same counters, tokens kept and bytes; the graph protocol restores and advances every group."""
    layer = LayerSpec(0, 1, 8, 4, 32)
    bits = [2, 4, 4, 3, 8, 4, 4, 5]
    stores = {f: _method("kivi", f, bits, 1, 4, KIVI_SMALL).new_layer(layer, batch=2, capacity=40, device="cpu",
                                                                      dtype=torch.float32) for f in ("off", "on")}
    on, off = stores["on"], stores["off"]
    assert isinstance(on, GroupedStore) and [h.tolist() for h in on.head_idx] == [[0], [3], [1, 2]]
    assert on.kernel == "fused" and on.graph_safe and all(st.kernel == "fused" for st in on.groups)
    assert isinstance(off, GroupedStore) and len(off.groups) == 4
    assert off.kernel == "reference" and not off.graph_safe
    steps = [(29, [[True] * 29, [True] * 27 + [False] * 2])] + [(1, [[True], [True]])] * 3
    _steps(stores, steps, H_q=8, H_kv=4, D=32, seed=7, tol=1e-5)
    # the engine's capture: snapshot, the step's Python twice (warm-up, capture) on rows that count no token, restore
    snap = on.graph_snapshot()
    before = [(st.lengths.clone(), st.seen.clone(), st.hi) for st in on.groups]
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(2, 8, 1, 32, generator=g), *torch.randn(2, 2, 4, 1, 32, generator=g)
    pos = torch.zeros(2, 1, dtype=torch.long)
    for _ in range(2):
        on.extend(q, k, v, positions=pos, valid=torch.zeros(2, 1, dtype=torch.bool), scaling=32**-0.5)
    assert all(st.hi == hi + 2 for st, (_, _, hi) in zip(on.groups, before))
    on.graph_restore(snap)
    assert all(torch.equal(st.lengths, n) and torch.equal(st.seen, s) and st.hi == hi
               for st, (n, s, hi) in zip(on.groups, before))
    on.graph_advance(3)  # three replays: every group's host bound
    assert all(st.hi == hi + 3 for st, (_, _, hi) in zip(on.groups, before))
    on.graph_restore(snap)
    _steps(stores, [(1, [[True], [False]])], H_q=8, H_kv=4, D=32, seed=9, tol=1e-5)
    assert off.groups[0].lengths.tolist() == [33, 30]  # row 0 filled its key window at slot 31
    a, b = off.stats(), on.stats()
    assert torch.equal(a.tokens_kept, b.tokens_kept) and torch.equal(a.tokens_seen, b.tokens_seen)
    assert (a.bytes_stored, a.bytes_read_per_step, a.bytes_allocated, a.bytes_full) == (
        b.bytes_stored, b.bytes_read_per_step, b.bytes_allocated, b.bytes_full)
    fork = on.fork()
    assert fork.kernel == "fused" and all(x.k_codes is not y.k_codes for x, y in zip(fork.groups, on.groups))


def test_ratequant_over_turboquant_groups_heads_by_width(interpret):
    """turboquant_kqv (its kernel serves whole layers: each group is a layer of its heads): the fused store is two
    stores, the reference three; outputs to 2e-6, and bytes lower by exactly the codec constants (rotation signs,
    QJL projection) that the reference holds once per head and the fused store once per width pair."""
    layer = LayerSpec(0, 1, 6, 3, 32)
    bits = [4, 3, 4, 4, 5, 4]
    stores = {f: _method("turboquant_kqv", f, bits, 1, 3).new_layer(layer, batch=2, capacity=16, device="cpu",
                                                                    dtype=torch.float32) for f in ("off", "on")}
    on, off = stores["on"], stores["off"]
    assert [h.tolist() for h in on.head_idx] == [[1], [0, 2]] and on.kernel == "fused" and on.graph_safe
    assert len(off.groups) == 3 and off.kernel == "reference"
    const = off.stats().bytes_stored - on.stats().bytes_stored  # no tokens yet: the codec constants
    steps = [(5, [[True] * 5, [True] * 5]), (3, [[True] * 3, [True, False, False]]), (1, [[True], [True]])]
    _steps(stores, steps, H_q=6, H_kv=3, D=32, seed=9, tol=2e-6)
    a, b = off.stats(), on.stats()
    assert const > 0 and a.bytes_stored - b.bytes_stored == const  # 3 heads' constants, 2 width pairs'
    assert torch.equal(a.tokens_kept, b.tokens_kept)


def _prompts(lengths, q_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                   question=torch.randint(3, 250, (q_len,), generator=g).tolist()) for n in lengths]


def _compare(model, make, prompts, *, n_new, chunk, tol):
    outs = {}
    for fused in ("off", "on"):
        engine = Engine(model, make(fused), prefill_chunk=chunk)
        outs[fused] = engine.generate(prompts, max_new_tokens=n_new, return_logits=True)
        assert engine.kernel == ("reference" if fused == "off" else "fused")  # the row's kernel column
        assert engine.graph_error is None
    ref, fast = outs["off"], outs["on"]
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for s_ref, s_fast in ((ref.stats_context, fast.stats_context), (ref.stats_final, fast.stats_final)):
        assert s_fast.bytes_stored == s_ref.bytes_stored and s_fast.bytes_read_per_step == s_ref.bytes_read_per_step
        assert torch.equal(s_fast.tokens_kept, s_ref.tokens_kept)
    return ref, fast


@pytest.fixture(scope="module")
def llama_4kv():
    """A tiny random Llama with 4 kv heads (8 query heads, head_dim 32): room for a group of several heads."""
    from harness.models import build_random_model, tiny_config

    return build_random_model(tiny_config("llama", num_attention_heads=8, num_key_value_heads=4, hidden_size=128),
                              seed=0)


@pytest.mark.slow  # 12 s under the interpreter; the grouping itself is checked in the default suite (above)
def test_ratequant_over_kivi_gives_the_reference_tokens(interpret, llama_4kv):
    """Through the engine (2 layers: one with widths (2, 8), (4, 4) x 2, (3, 5), one with every head at (4, 4) = one
    KIVI store; a ragged batch whose padded prefill chunk takes the reference path, row 0's key window filling
    during decode): the row says fused, same greedy tokens, logits to 1e-4, same bytes stored and read."""
    bits = [2, 4, 4, 3, 4, 4, 4, 4, 8, 4, 4, 5, 4, 4, 4, 4]
    _compare(llama_4kv, lambda f: _method("kivi", f, bits, 2, 4, KIVI_SMALL), _prompts([29, 20], 2), n_new=3,
             chunk=32, tol=1e-4)


# -- GPU (pytest -m gpu on the GPU machine) ---------------------------------------------------------


# kvbench-tiny: 4 layers, 2 kv heads: layer 0 both heads (4, 4) (one store), the others mixed
GPU_BITS = [4, 4, 2, 3, 4, 8, 5, 4] + [4, 4, 6, 5, 4, 2, 3, 4]


@pytest.mark.gpu
def test_ratequant_over_kivi_gives_the_reference_tokens_on_gpu():
    """The trained tiny model, KIVI's defaults (group 32, ring 128), 16 prompts (equal and ragged lengths), CUDA-graph
    decode crossing key windows: fp32 logits to 1e-4 and the same greedy tokens; bf16 logits to 1e-2 of their scale
    and rows parting only at near ties (as the fused KIVI test)."""
    prompts = random_qa_prompts(GPU_LENGTHS, q_len=8)
    for dtype in ("float32", "bfloat16"):
        model = gpu_tiny_model(dtype)
        outs = {}
        for fused in ("off", "on"):
            engine = Engine(model, _method("kivi", fused, GPU_BITS, 4, 2), prefill_chunk=128)
            outs[fused] = engine.generate(prompts, max_new_tokens=40, return_logits=True)
            assert engine.kernel == ("fused" if fused == "on" else "reference") and engine.graph_error is None
        ref, fast = outs["off"], outs["on"]
        if dtype == "float32":
            assert fast.tokens == ref.tokens
            for a, b in zip(ref.logits, fast.logits):
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        else:
            for a, b in zip(ref.logits, fast.logits):
                n = min(len(a), len(b))
                assert float((a[:n] - b[:n]).abs().max() / a[:n].abs().max()) < 1e-2
            bad = divergences_not_near_ties(ref, fast, 1e-1)  # rows part only at near ties (as the fused KIVI test)
            assert not bad, bad
        assert fast.stats_context.bytes_stored == ref.stats_context.bytes_stored


@pytest.mark.gpu
def test_ratequant_over_kivi_decode_step_is_captured_and_does_not_sync():
    model = gpu_tiny_model("bfloat16")
    engine = Engine(model, _method("kivi", "auto", GPU_BITS, 4, 2, {"residual_length": 32}))
    state = engine.new_state(2, 96)
    assert state.graph_safe and state.kernel == "fused"
    assert [len(layer.groups) for layer in state.layers] == [1, 2, 2, 2]
    ctx = [list(range(3, 33)), list(range(5, 35))]  # 30 tokens: the decode steps fill the key window (slot 31)
    engine.run_segment(state, ctx, [0, 0], chunk=None, want_last=[True, True], last_logits=None)
    step = engine._decode_step(state, 2)
    tok = torch.tensor([1, 2], device="cuda")
    pos = torch.tensor([30, 30], device="cuda")
    valid = torch.ones(2, dtype=torch.bool, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            step(tok, pos + i, valid)
        engine.step_forward(state, tok[:, None], (pos + 3)[:, None], valid[:, None])  # eager too
    finally:
        torch.cuda.set_sync_debug_mode("default")
    step.finish()
    assert engine.graph_error is None
    for layer in state.layers:
        for st in layer.groups:
            assert st.lengths.tolist() == [34, 34] and st.hi == 34
