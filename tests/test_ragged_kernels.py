"""Issue 21 (eviction half): the ragged decode kernels, the blockwise prefill scoring and the fused eviction stores,
against their torch references. CPU under Triton's interpreter (``TRITON_INTERPRET=1``, small shapes); the ``gpu``
tests rerun them compiled, with CUDA-graph decode."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.engine import Engine, Prompt
from methods.eviction import H2O, VATP, AdaKV, KNorm, PyramidKV, RandomEviction, SnapKV
from methods.kernels.ragged_attention import (
    BIG,
    ragged_append_reference,
    ragged_update_reference,
    segment_attend,
    segment_ids,
)
from methods.kernels.scoring import attention_mass_blockwise, slot_visibility, window_attention_blockwise
from methods.ragged import EvictionStore, FusedEvictionStore
from methods.selectors import attention_mass, keep_count_t, window_attention
from methods.streaming_llm import FusedStreamingStore, StreamingLLM, StreamingStore
from methods.value_aware import ValueAware

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

from methods.kernels.ragged_attention import (  # noqa: E402
    ragged_append,
    ragged_decode,
    ragged_evict,
    ragged_grid,
    ragged_update,
    ranges_argmin,
)
from methods.kernels.scoring import (  # noqa: E402
    accumulate_mass,
    prefill_attention_lse,
    prefill_attention_lse_reference,
)
from tests.helpers import graph_steps_without_sync  # noqa: E402

LOG2E = 1.4426950408889634


def eviction_methods(ratio=0.5, small=True):
    """Every eviction method at ``ratio`` (windows and blocks small enough for short prompts)."""
    w = dict(window=4) if small else {}
    return [StreamingLLM(ratio=ratio, n_sink=2), RandomEviction(ratio=ratio), KNorm(ratio=ratio), H2O(ratio=ratio),
            SnapKV(ratio=ratio, **w), PyramidKV(ratio=ratio, **w), AdaKV(ratio=ratio, **w), VATP(ratio=ratio),
            VATP(ratio=ratio, support="window", **w), ValueAware(ratio=ratio, **(dict(window=4, block_size=4) if small
                                                                                   else {}))]


def method_id(m):
    return m.name + ("-" + m.support if getattr(m, "support", "") in ("window",) else "")


def _segments(g, sizes, D, dtype=torch.float32, device="cpu"):
    sizes = torch.tensor(sizes, device=device)
    offsets = torch.cumsum(sizes, 0) - sizes
    N = int(sizes.sum())
    k = torch.randn(N, D, generator=g, device=device).to(dtype)
    v = torch.randn(N, D, generator=g, device=device).to(dtype)
    n_vis = torch.stack([torch.randint(1, int(s) + 1, (1,), generator=g, device=device)[0] for s in sizes])
    return k, v, offsets, sizes, n_vis


# -- kernels against references --------------------------------------------------------------------
def test_kernel_globals_are_constexpr_instances():
    """Compiled Triton reads a module global only if it is a ``tl.constexpr(...)`` instance (an annotation is not
    enough, and the interpreter accepts either): a GPU-only compile error the CPU suite would otherwise miss."""
    import types

    import triton.language as tl

    from methods.kernels import _ragged_triton as K

    kernels = [v for v in vars(K).values() if hasattr(v, "fn") and hasattr(v.fn, "__code__")]
    assert len(kernels) >= 7
    used = {name for kern in kernels for name in kern.fn.__code__.co_names}  # globals the kernels read
    for name in sorted(used & set(vars(K))):
        value = vars(K)[name]
        if isinstance(value, (types.ModuleType, type)) or callable(value):
            continue
        assert isinstance(value, tl.constexpr), f"{name} = {value!r} must be tl.constexpr(...)"
    assert "BIG_IDX" in used

@pytest.mark.parametrize("shape", [(2, 3, 2, 32), (1, 4, 4, 16), (3, 1, 8, 64)], ids=str)  # (B, H_kv, G, D)
def test_ragged_decode_matches_segment_attention(interpret, shape):
    B, H, G, D = shape
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 150, (B * H,), generator=g).tolist()
    k, v, offsets, sizes_t, n_vis = _segments(g, sizes, D)
    N = k.shape[0]
    seg, rel = segment_ids(offsets, N)
    visible = rel < n_vis[seg]
    k[~visible] = float("nan")  # slots past a segment's visible prefix are never read
    v[~visible] = float("nan")
    qq = torch.randn(B, H * G, 3, D, generator=g)
    q = qq[:, :, 1]  # (B, H_q, D) with strides, as the fused decoder hands it over
    want, probs = segment_attend(q[:, :, None], k.nan_to_num(), v.nan_to_num(), seg, sizes_t, visible,
                                 n_kv_heads=H, scaling=D**-0.5)
    for n_ranges, split in (ragged_grid(max(sizes), B * H, D, "cpu"), (1, 192), (3, 64)):
        logits = torch.full((N, G), float("nan"))
        out, lse = ragged_decode(q, k, v, offsets, n_vis, scaling=D**-0.5, n_ranges=n_ranges, split=split,
                                 logits=logits)
        torch.testing.assert_close(out, want[:, 0], atol=1e-5, rtol=1e-5)
        p = torch.exp2(logits - lse.view(B, H, G).reshape(B * H, G)[seg])  # (N, G)
        torch.testing.assert_close(p[visible], probs[visible], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reduce", ["mean", "max", "sum"])
def test_ragged_update_matches_reference(interpret, reduce):
    B, H, G, D = 2, 2, 3, 16
    g = torch.Generator().manual_seed(1)
    sizes = [70, 5, 130, 40]
    k, v, offsets, sizes_t, n_vis = _segments(g, sizes, D)
    N = k.shape[0]
    seg, rel = segment_ids(offsets, N)
    visible = rel < n_vis[seg]
    q = torch.randn(B, H * G, D, generator=g)
    _, probs = segment_attend(q[:, :, None], k, v, seg, sizes_t, visible, n_kv_heads=H, scaling=D**-0.5)
    score = torch.randint(0, 4, (N,), generator=g).float()  # ties: the earliest slot must win
    pos = rel.int()
    valid = torch.tensor([True, False])  # row 1 (segments 2, 3) has finished: its scores gain nothing
    ok = valid[:, None].expand(B, H).reshape(-1)
    lim = torch.tensor([60, 3, 100, 0])  # the last segment has no candidate (position 0 < n_sink)
    for n_ranges, split in ((1, 192), (3, 64)):
        want = score.clone()
        first_want = ragged_update_reference(want, pos, seg, rel, visible, ok, probs=probs, reduce=reduce,
                                             pos_limit=lim, n_sink=1)
        got = score.clone()
        logits = torch.empty(N, G)
        _, lse = ragged_decode(q, k, v, offsets, n_vis, scaling=D**-0.5, n_ranges=n_ranges, split=split, logits=logits)
        first = ranges_argmin(*ragged_update(got, pos, offsets, n_vis, valid, n_kv_heads=H, n_ranges=n_ranges,
                                             split=split, logits=logits, lse=lse, reduce=reduce, pos_limit=lim,
                                             n_sink=1))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        assert first.tolist() == first_want.tolist()
        assert first[3] == BIG and bool((got[seg >= 2] == score[seg >= 2]).all())  # no candidate; finished row
    # eviction only (LKV: scores written, nothing accumulated)
    got = score.clone()
    first = ranges_argmin(*ragged_update(got, pos, offsets, n_vis, valid, n_kv_heads=H, n_ranges=2, split=128,
                                         pos_limit=lim, n_sink=1))
    assert torch.equal(got, score)
    assert first.tolist() == ragged_update_reference(score.clone(), pos, seg, rel, visible, ok, pos_limit=lim,
                                                     n_sink=1).tolist()


def test_ragged_evict_frees_the_first_lowest_candidate_of_over_budget_segments(interpret):
    g = torch.Generator().manual_seed(6)
    B, H, R = 2, 3, 4
    mid_min = torch.randint(0, 3, (B * H, R), generator=g).float()
    mid_min[1] = float("inf")  # segment 1: no candidate in any range
    mid_idx = torch.randint(0, 50, (B * H, R), generator=g).int().sort(1).values  # ranges in slot order
    mid_idx[1] = BIG
    hwm = torch.randint(5, 40, (B * H,), generator=g)
    hole = torch.full((B * H,), -1)
    seen = torch.tensor([60, 33])
    base = torch.randint(-30, 10, (B * H,), generator=g)
    for ratio in (0.5, 0.9):
        for valid in (torch.tensor([[True], [True]]), torch.tensor([[True], [False]])):
            want = hole.clone()
            first = ranges_argmin(mid_min, mid_idx)
            ok = valid[:, :1].expand(B, H).reshape(-1)
            budget = base + keep_count_t(seen, ratio)[:, None].expand(B, H).reshape(-1)
            over = ok & (hwm - (want >= 0).long() > budget)
            want = torch.where(over & (first < BIG), first, want)
            got = hole.clone()
            ragged_evict(mid_min, mid_idx, valid, hwm, got, seen, base, ratio=ratio)
            assert torch.equal(got, want) and bool((got >= 0).any()), (ratio, valid.tolist())


def test_ragged_append_matches_reference(interpret):
    B, H, D = 2, 3, 16
    g = torch.Generator().manual_seed(5)
    sizes = [9, 4, 7, 12, 5, 6]
    k, v, offsets, _, _ = _segments(g, sizes, D)
    N = k.shape[0]
    hwm = torch.tensor([5, 4 - 1, 2, 12 - 1, 3, 6 - 1])
    hole = torch.tensor([-1, 1, -1, 4, 0, -1])  # some segments had a slot freed by the last eviction
    qkv = torch.randn(B, 3 * H, 1, D, generator=g)
    k_new, v_new = qkv[:, :H], qkv[:, H : 2 * H]  # views into one buffer, as the fused decoder gives them
    positions = torch.tensor([[40], [17]])
    n_recent = torch.tensor([2, 0, 3, 1, 1, 5])
    for valid in (torch.tensor([[True], [False]]), torch.tensor([[True], [True]])):
        state = [k.clone(), v.clone(), hwm.clone(), hole.clone(), torch.tensor([40, 17]),
                 torch.zeros(N, dtype=torch.int32), torch.rand(N, generator=g)]
        ref = [t.clone() for t in state]
        score_new = torch.randn(B * H, generator=g)
        a = ragged_append(k_new, v_new, state[0], state[1], offsets, state[2], state[3], valid, state[4], positions,
                          pos=state[5], score=state[6], score_new=score_new, n_recent=n_recent)
        b = ragged_append_reference(k_new, v_new, ref[0], ref[1], offsets, ref[2], ref[3], valid, ref[4], positions,
                                    pos=ref[5], score=ref[6], score_new=score_new, n_recent=n_recent)
        for x, y in zip((*a, *state), (*b, *ref)):
            assert torch.equal(x, y)
        assert b[0].tolist() == [6, 3, 3, 11, 3, 6]  # a hole keeps the prefix; a high-water mark grows it


@pytest.mark.parametrize("shape", [(2, 6, 2, 32, 45), (1, 4, 4, 16, 130)], ids=str)  # (B, H_q, H_kv, D, S)
def test_prefill_lse_and_mass_kernels_match_references(interpret, shape):
    B, H_q, H_kv, D, S = shape
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, B, H_kv, S + 7, D, generator=g)
    mass_ref = torch.zeros(B, H_q, S + 7)
    mass = torch.zeros(B, H_q, S + 7)
    for start, T in ((0, S - 20), (S - 20, 20)):  # a first chunk, then a chunk over earlier slots
        q = torch.randn(B, H_q, T + 2, D, generator=g)[:, :, 1:-1]  # strided
        out, lse = prefill_attention_lse(q, k, v, start=start, scaling=D**-0.5)
        out_ref, lse_ref = prefill_attention_lse_reference(q, k, v, start=start, scaling=D**-0.5)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
        accumulate_mass(q, k, lse, mass, start=start, scaling=D**-0.5)
        slots = torch.arange(start + T)
        vis = (slots[None, None, None] <= (start + torch.arange(T))[None, None, :, None]).expand(B, 1, T, start + T)
        mass_ref[:, :, : start + T] += attention_mass(q, k[:, :, : start + T], vis, scaling=D**-0.5, chunk=7)
    torch.testing.assert_close(mass, mass_ref, atol=1e-5, rtol=1e-5)


def test_blockwise_scores_match_the_one_shot_references():
    g = torch.Generator().manual_seed(3)
    B, H_q, H_kv, S, D, W = 2, 6, 2, 37, 8, 4
    k = torch.randn(B, H_kv, S, D, generator=g)
    n = torch.tensor([37, 22])
    win_slot = torch.tensor([[33, 34, 35, 36], [-1, 19, 20, 21]])
    q_win = torch.randn(B, H_q, W, D, generator=g)
    want = window_attention(q_win, win_slot, k, n, scaling=0.3)
    for max_elems in (1, 500, 1 << 24):  # blocks of 16 keys, a few, one
        torch.testing.assert_close(window_attention_blockwise(q_win, win_slot, k, n, scaling=0.3, max_elems=max_elems),
                                   want, atol=1e-6, rtol=1e-5)
    T = 9
    q = torch.randn(B, H_q, T, D, generator=g)
    dest = torch.tensor([list(range(28, 37)), list(range(13, 22))])
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, -2:] = False  # padding queries pay nothing
    vis_fn = slot_visibility(dest, n, valid)
    want = attention_mass(q, k, vis_fn(0, T, 0, S), scaling=0.3, chunk=4)
    for max_elems in (1, 3000, 1 << 24):
        got = attention_mass_blockwise(q, k, vis_fn, scaling=0.3, max_elems=max_elems)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _Recorder(TorchDispatchMode):
    """Records the largest tensor any aten op returns, and host-synchronising ops (.item(), bool(), nonzero)."""

    SYNC = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten.repeat_interleave")

    def __init__(self):
        super().__init__()
        self.largest, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if any(name == s for s in self.SYNC):
            self.syncs.append(name)
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:  # uint8: the interpreter's host storage copies
                self.largest = max(self.largest, t.numel())
        return out


def test_blockwise_scoring_never_materialises_the_attention_matrix():
    """The working set of the prefill scorers: no temporary of B x H x T x S (or B x H x S x D float32 keys)."""
    B, H_q, H_kv, T, S, D, W = 2, 4, 2, 64, 512, 16, 16
    q = torch.randn(B, H_q, T, D)
    k = torch.randn(B, H_kv, S, D)
    n = torch.full((B,), S)
    vis = slot_visibility(torch.arange(S - T, S).expand(B, T), n, torch.ones(B, T, dtype=torch.bool))
    budget = 1 << 13
    with _Recorder() as rec:
        attention_mass_blockwise(q, k, vis, scaling=0.25, max_elems=budget)
    assert rec.largest <= max(budget, B * H_q * S) < B * H_q * T * S // 8
    win_slot = torch.arange(S - W, S).expand(B, W)
    with _Recorder() as rec:
        window_attention_blockwise(q[:, :, :W], win_slot, k, n, scaling=0.25, max_elems=budget)
    assert rec.largest <= max(budget, B * H_q * S) < B * H_q * W * S
    with _Recorder() as rec:  # the reference copies the keys once per query head
        window_attention(q[:, :, :W], win_slot, k, n, scaling=0.25)
    assert rec.largest >= B * H_q * S * D


def test_fused_mass_working_set_is_the_lse(interpret):
    B, H_q, H_kv, T, S, D = 1, 4, 2, 64, 128, 16
    q = torch.randn(B, H_q, T, D)
    k, v = torch.randn(2, B, H_kv, S, D)
    mass = torch.zeros(B, H_q, S)
    with _Recorder() as rec:
        _, lse = prefill_attention_lse(q, k, v, start=S - T, scaling=0.25)
        accumulate_mass(q, k, lse, mass, start=S - T, scaling=0.25)
    assert rec.largest <= max(B * T * H_q * D, B * H_q * S) and not rec.syncs


# -- the fused stores against the reference stores --------------------------------------------------
def _prompts(lengths, q_len=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                   question=torch.randint(3, 250, (q_len,), generator=g).tolist() if q_len else []) for n in lengths]


def _both(model, method, prompts, n_new=5, chunk=8):
    outs, kinds = {}, {}
    for fused in ("off", "on"):
        m = copy.deepcopy(method)
        m.fused = fused
        engine = Engine(copy.deepcopy(model), m, prefill_chunk=chunk)
        outs[fused] = engine.generate(prompts, max_new_tokens=n_new, return_logits=True)
        kinds[fused] = (engine.kernel, type(engine.new_state(1, 8).layers[0]))
    return outs["off"], outs["on"], kinds


# under the interpreter a representative set (every kernel, every store path); the gpu tests take every method
CASES = [(m, "aligned") for m in eviction_methods() if m.name in ("streaming_llm", "h2o", "snapkv", "adakv")] + [
    (m, "ragged+question") for m in eviction_methods() if m.name in ("h2o", "value_aware")]


@pytest.mark.parametrize("method,case", CASES, ids=lambda x: x if isinstance(x, str) else method_id(x))
def test_fused_store_gives_the_reference_tokens(interpret, tiny_llama, method, case):
    """Aligned rows run the fused prefill (with the mass kernel for H2O/VATP) and the ragged decode kernel; a
    padded batch with a question the reference prefill, the blockwise scores and the repack, then the kernel."""
    lengths, q_len = ([29, 29], 0) if case == "aligned" else ([29, 18], 4)
    ref, fast, kinds = _both(tiny_llama, method, _prompts(lengths, q_len), n_new=4)
    assert kinds["off"][0] == "reference" and kinds["on"][0] == "fused"
    assert kinds["on"][1] in (FusedEvictionStore, FusedStreamingStore)
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for s_ref, s_fast in ((ref.stats_context, fast.stats_context), (ref.stats_final, fast.stats_final)):
        assert s_fast.bytes_stored == s_ref.bytes_stored
        assert torch.equal(s_fast.tokens_kept, s_ref.tokens_kept)


def test_fused_h2o_evicts_the_same_tokens_during_decode(interpret, tiny_llama):
    """H2O's decode-time eviction on the device (accumulated attention from the kernel's probabilities, the
    arg-min pass) frees the same slots as the reference, step after step."""
    prompts = _prompts([30, 19], q_len=0)
    states = {}
    for fused in ("off", "on"):
        engine = Engine(copy.deepcopy(tiny_llama), H2O(ratio=0.5, fused=fused), prefill_chunk=8)
        state = engine.new_state(2, 40)
        engine.run_segment(state, [p.context for p in prompts], [0, 0], chunk=8, want_last=[True, True],
                           last_logits=None)
        state.end_of_context()
        g = torch.Generator().manual_seed(0)
        for step in range(5):
            tok = torch.randint(3, 250, (2, 1), generator=g)
            engine.step_forward(state, tok, torch.tensor([[30 + step], [19 + step]]),
                                torch.tensor([[True], [step < 3]]))
        states[fused] = state
    for a, b in zip(states["off"].layers, states["on"].layers):
        occ_a, occ_b = a._occupied()[0], b._occupied()[0]
        assert torch.equal(occ_a, occ_b) and torch.equal(a.pos[occ_a], b.pos[occ_b])
        torch.testing.assert_close(b.score[occ_b], a.score[occ_a], atol=1e-5, rtol=1e-5)
        assert torch.equal(a.seen, b.seen)
        assert bool((a.tokens_kept() < a.seen[:, None]).all()), "h2o should have evicted during decode"


def test_fused_decode_step_does_not_sync_and_restores_from_a_snapshot(interpret, tiny_llama):
    """The decode step of every graph-safe store: no op that synchronises with the host (what the CUDA graph
    needs), and graph_snapshot / graph_restore undo a warm-up step."""
    prompts = _prompts([21, 21], q_len=0)
    for method in (StreamingLLM(ratio=0.5, n_sink=2), SnapKV(ratio=0.5, window=4), H2O(ratio=0.5, n_sink=2),
                   ValueAware(ratio=0.5, window=4, block_size=4)):  # no scores; scores, accumulation, eviction; positions
        m = copy.deepcopy(method)
        m.fused = "on"
        engine = Engine(copy.deepcopy(tiny_llama), m, prefill_chunk=8)
        state = engine.new_state(2, 40)
        engine.run_segment(state, [p.context for p in prompts], [0, 0], chunk=8, want_last=[True, True],
                           last_logits=None)
        state.end_of_context()
        assert state.graph_safe and state.kernel == "fused", method.name
        snaps = [layer.graph_snapshot() for layer in state.layers]
        before = [{n: t.clone() for n, t in vars(layer).items() if isinstance(t, torch.Tensor)} for layer in state.layers]
        args = (torch.tensor([[5], [6]]), torch.tensor([[21], [21]]), torch.tensor([[True], [True]]))
        with _Recorder() as rec:
            engine.step_forward(state, *args)
        assert not rec.syncs, (method.name, rec.syncs)
        for layer, snap in zip(state.layers, snaps):
            layer.graph_restore(snap)
        for layer, saved in zip(state.layers, before):
            for name in ("hwm", "hole", "seen", "score", "free_rel"):
                if name in saved:
                    assert torch.equal(getattr(layer, name), saved[name]), (method.name, name)


def test_value_aware_with_decode_support_is_fused_but_not_graph_safe(interpret, tiny_llama):
    m = ValueAware(ratio=0.5, support="decode_queries", window=4, block_size=4, rescore_every=2, fused="on")
    ref, fast, kinds = _both(tiny_llama, m, _prompts([29, 18], 4), n_new=4)
    assert fast.tokens == ref.tokens
    store = Engine(copy.deepcopy(tiny_llama), m).new_state(1, 8).layers[0]
    assert store.kernel == "fused" and not store.graph_safe  # the re-scoring repacks on the host: eager decode


def test_fused_auto_is_the_reference_on_cpu_and_off_is_always_the_reference(tiny_llama):
    from methods.api import LayerSpec

    for method in (H2O(ratio=0.5), StreamingLLM(ratio=0.5)):
        store = Engine(copy.deepcopy(tiny_llama), method).new_state(1, 8).layers[0]
        assert type(store) in (EvictionStore, StreamingStore) and store.kernel == "reference"
    with pytest.raises(ValueError, match="fused must be one of"):
        SnapKV(fused="yes")
    with pytest.raises(ValueError, match="head_dim 80"):
        SnapKV(fused="on").new_layer(LayerSpec(0, 1, 4, 2, 80), batch=1, capacity=4, device="cpu",
                                     dtype=torch.float32)


# -- GPU (pytest -m gpu on the GPU machine) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ragged_kernels_match_references_on_gpu(dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, H, G, D in ((2, 8, 4, 128), (4, 2, 3, 64), (1, 1, 8, 64)):
        sizes = torch.randint(1, 3000, (B * H,), generator=g, device="cuda").tolist()
        k, v, offsets, sizes_t, n_vis = _segments(g, sizes, D, dtype, "cuda")
        N = k.shape[0]
        seg, rel = segment_ids(offsets, N)
        visible = rel < n_vis[seg]
        q = torch.randn(B, H * G, D, generator=g, device="cuda").to(dtype)
        want, probs = segment_attend(q[:, :, None], k, v, seg, sizes_t, visible, n_kv_heads=H, scaling=D**-0.5)
        n_ranges, split = ragged_grid(max(sizes), B * H, D, "cuda")
        logits = torch.empty(N, G, device="cuda")
        out, lse = ragged_decode(q, k, v, offsets, n_vis, scaling=D**-0.5, n_ranges=n_ranges, split=split,
                                 logits=logits)
        torch.testing.assert_close(out.float(), want[:, 0].float(), atol=tol, rtol=tol)
        score = torch.rand(N, generator=g, device="cuda")
        want_s = score.clone()
        lim = torch.full((B * H,), 2000, device="cuda")
        ok = torch.ones(B * H, dtype=torch.bool, device="cuda")
        ragged_update_reference(want_s, rel.int(), seg, rel, visible, ok, probs=probs, pos_limit=lim)
        ragged_update(score, rel.int(), offsets, n_vis, ok.view(B, H)[:, 0], n_kv_heads=H, n_ranges=n_ranges,
                      split=split, logits=logits, lse=lse, pos_limit=lim)
        torch.testing.assert_close(score, want_s, atol=1e-4 if dtype == torch.bfloat16 else 1e-6, rtol=1e-3)
        T, S = 200, 1500
        kk, vv = torch.randn(2, B, H, S, D, generator=g, device="cuda").to(dtype)
        qq = torch.randn(B, H * G, T, D, generator=g, device="cuda").to(dtype)
        out, lse = prefill_attention_lse(qq, kk, vv, start=S - T, scaling=D**-0.5)
        out_ref, lse_ref = prefill_attention_lse_reference(qq, kk, vv, start=S - T, scaling=D**-0.5)
        torch.testing.assert_close(out.float(), out_ref.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, lse_ref, atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-4)
        mass = torch.zeros(B, H * G, S, device="cuda")
        accumulate_mass(qq, kk, lse, mass, start=S - T, scaling=D**-0.5)
        vis = slot_visibility(torch.arange(S - T, S, device="cuda").expand(B, T), torch.full((B,), S, device="cuda"),
                              torch.ones(B, T, dtype=torch.bool, device="cuda"))
        want_m = attention_mass_blockwise(qq, kk, vis, scaling=D**-0.5)
        torch.testing.assert_close(mass, want_m, atol=5e-3 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("method", eviction_methods(small=False), ids=method_id)
def test_cuda_graph_eviction_decode_gives_the_reference_tokens(tiny_llama, method):
    """Every eviction method on the GPU: the fused store with the CUDA-graph decode step against the reference
    store decoding eagerly: same greedy tokens, logits to 1e-4 (fp32), same kept tokens; no host sync in a step."""
    model = copy.deepcopy(tiny_llama).cuda()
    prompts = _prompts([300, 300], q_len=0)
    outs = {}
    for name, fused, graph in (("reference", "off", False), ("fused-graph", "auto", True)):
        m = copy.deepcopy(method)
        m.fused = fused
        engine = Engine(model, m, prefill_chunk=128, cuda_graph=graph)
        outs[name] = engine.generate(prompts, max_new_tokens=12, return_logits=True)
        assert engine.graph_error is None
        assert engine.kernel == ("reference" if fused == "off" else "fused")
    assert outs["fused-graph"].tokens == outs["reference"].tokens
    for a, b in zip(outs["reference"].logits, outs["fused-graph"].logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert torch.equal(outs["fused-graph"].stats_final.tokens_kept, outs["reference"].stats_final.tokens_kept)


@pytest.mark.gpu
@pytest.mark.parametrize("method", [H2O(ratio=0.5), SnapKV(ratio=0.9), StreamingLLM(ratio=0.5)], ids=method_id)
def test_graph_eviction_step_does_not_sync_with_host(tiny_llama, method):
    model = copy.deepcopy(tiny_llama).cuda()
    engine = Engine(model, method)
    state = engine.new_state(2, 200)
    engine.run_segment(state, [p.context for p in _prompts([150, 150], q_len=0)], [0, 0], chunk=64,
                       want_last=[True, True], last_logits=None)
    state.end_of_context()
    graph_steps_without_sync(engine, state, start=150, steps=3)
    assert state.stats().tokens_seen.tolist() == [153 * len(state.layers)] * 2
