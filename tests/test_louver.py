"""louver and quest: the range-search gate has zero false negatives; outputs are exact over what is read."""

import copy
import math

import pytest
import torch

from harness.engine import Engine, Prompt
from methods.full import Full
from methods.louver import (
    Louver,
    balanced_groups,
    build_index,
    id_bits,
    pack_ids,
    survivors,
    thresholds,
    unpack_ids,
    upper_bounds,
)
from methods.quest import Quest
from methods.stores import attend
from tests.helpers import graph_steps_without_sync, random_prompts, run


def _keys(seed, B=2, H=2, N=300, D=32, aniso=True):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, N, D, generator=g)
    if aniso:  # real keys: a few large channels and a mean offset
        k = k * torch.linspace(0.1, 4.0, D) + torch.randn(D, generator=g)
    return k, g


@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 64, 129])
def test_balanced_groups_are_complete_and_small(n):
    x = torch.randn(3, n, 4)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, n // 2 :] = False
    parent, n_par = balanced_groups(x, valid, branching=4)
    for b in range(3):
        assert (parent[b][~valid[b]] == -1).all()
        cnt = torch.bincount(parent[b][valid[b]], minlength=int(n_par[b]))
        assert len(cnt) == int(n_par[b]) == math.ceil(int(valid[b].sum()) / 4)
        if len(cnt):
            assert 1 <= int(cnt.min()) and int(cnt.max()) <= 4


@pytest.mark.parametrize("seed", range(12))
def test_no_false_negatives_on_random_keys(seed):
    k, g = _keys(seed, aniso=seed % 2 == 0)
    B, H, N, D = k.shape
    valid = torch.rand(B, N, generator=g) < 0.9
    S = [2, 4, 8][seed % 3]
    ix = build_index(k, valid, n_subspaces=S, branching=4, dtype=torch.float32)
    q = torch.randn(B, H, 3, D, generator=g) * 2
    sample = k[:, :, :64]
    t = thresholds(q, sample, valid[:, None, :64].expand(B, H, 64), mode="budget", fraction=[0.05, 0.1, 0.3][seed % 3])
    kmax = k.norm(dim=-1).amax(-1)
    surv = survivors(q, ix, t, kmax=kmax, gate_eps=1e-5)  # (B, H, G, N)
    exact = torch.einsum("bhgd,bhnd->bhgn", q, k)
    must = (exact >= t[..., None]) & valid[:, None, None, :]
    assert must.any()
    assert not (must & ~surv).any()
    assert not (surv & ~valid[:, None, None, :]).any()  # only indexed keys survive
    bound = upper_bounds(q, ix)
    assert (bound[..., valid[0]][0] >= exact[..., valid[0]][0] - 1e-4).all()  # the bound is an upper bound


def test_bf16_index_keeps_the_guarantee():
    k, g = _keys(7)
    k = k.to(torch.bfloat16)
    B, H, N, D = k.shape
    valid = torch.ones(B, N, dtype=torch.bool)
    ix = build_index(k, valid, n_subspaces=4, branching=4, dtype=torch.bfloat16)
    q = torch.randn(B, H, 4, D, generator=g)
    t = thresholds(q, k[:, :, :128], valid[:, None, :128].expand(B, H, 128), mode="budget", fraction=0.1)
    surv = survivors(q, ix, t, kmax=k.float().norm(dim=-1).amax(-1), gate_eps=1e-5)
    exact = torch.einsum("bhgd,bhnd->bhgn", q, k.float())
    assert not ((exact >= t[..., None]) & ~surv).any()


@pytest.mark.parametrize("mode", ["budget", "sample_max", "sample_mean_max", "sample_gap"])
def test_threshold_modes(mode):
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 2, 100, 16, generator=g)
    q = torch.randn(1, 2, 3, 16, generator=g)
    valid = torch.ones(1, 2, 100, dtype=torch.bool)
    t = thresholds(q, sample, valid, mode=mode, fraction=0.1)
    s = torch.einsum("bhgd,bhmd->bhgm", q, sample)
    frac = (s >= t[..., None]).float().mean(-1)
    if mode == "budget":
        assert torch.allclose(frac, torch.full_like(frac, 0.1))
    elif mode == "sample_max":
        assert torch.allclose(frac, torch.full_like(frac, 0.01))
    else:
        assert ((frac > 0) & (frac <= 0.5)).all()
    assert torch.isinf(thresholds(q, sample, valid & False, mode=mode, fraction=0.1)).all()


def test_no_false_negatives_on_captured_keys(tiny_llama):
    """Decode queries and keys captured from a model through the store itself, many steps."""
    prompts = random_prompts([70, 45])
    method = Louver(ratio=0.8, n_subspaces=4, sample_size=32, merge_every=5)
    engine = Engine(copy.deepcopy(tiny_llama), method, prefill_chunk=16)
    state = engine.new_state(2, 100)
    engine.run_segment(state, prompts, [0, 0], chunk=16, want_last=[False, False], last_logits=None)
    state.end_of_context()
    seen = {}
    for layer in state.layers:  # record each gate decision against exact scores
        orig = layer._select

        def select(qg, layer=layer, orig=orig):
            sel = orig(qg)
            m = layer.method
            t = thresholds(qg, layer.sample, layer.sample_valid, mode=m.threshold, fraction=1 - m.ratio)
            exact = torch.einsum("bhgd,bhnd->bhgn", qg, layer.k.float())
            indexed = torch.arange(layer.capacity)[None] < layer.idx_end[:, None]  # (B, S)
            must = (exact >= t[..., None]) & indexed[:, None, None]
            seen[id(layer)] = seen.get(id(layer), 0) + int((must & ~sel).sum())
            seen["must"] = seen.get("must", 0) + int(must.sum())
            return sel

        layer._select = select
    for step in range(12):  # crosses two buffer merges
        tok = torch.randint(0, 256, (2, 1))
        pos = torch.tensor([[70 + step], [45 + step]])
        engine.forward(state, tok, pos, torch.ones(2, 1, dtype=torch.bool), logits_at=torch.zeros(2, dtype=torch.long))
    assert seen.pop("must") > 0
    assert sum(seen.values()) == 0
    assert all(layer.n_merges == 3 for layer in state.layers)  # the context, then two buffer merges


@pytest.mark.parametrize("method", [Louver(ratio=0.7, n_subspaces=4, merge_every=3, sample_size=16),
                                    Quest(ratio=0.7, page_size=4, dense_layers=0)], ids=lambda m: m.name)
def test_output_is_dense_attention_over_what_was_read(method, tiny_llama):
    prompts = random_prompts([50, 33])
    engine = Engine(copy.deepcopy(tiny_llama), method, prefill_chunk=16)
    state = engine.new_state(2, 70)
    engine.run_segment(state, prompts, [0, 0], chunk=16, want_last=[False, False], last_logits=None)
    state.end_of_context()
    layer = state.layers[1]
    checked = []
    orig = layer._select

    def select(qg):  # idx_end as the step sees it (Quest closes a filled page at the start of a step)
        sel = orig(qg)
        checked.append((sel, layer.idx_end.clone()))
        return sel

    layer._select = select
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        B, H, D = 2, layer.layer.n_kv_heads, layer.layer.head_dim
        q = torch.randn(B, layer.layer.n_q_heads, 1, D, generator=g)
        k = torch.randn(B, H, 1, D, generator=g)
        v = torch.randn(B, H, 1, D, generator=g)
        valid = torch.ones(B, 1, dtype=torch.bool)
        lengths = layer.lengths.clone()
        out = layer.extend(q, k, v, positions=None, valid=valid, scaling=0.125)
        sel, idx_end = checked[-1]  # (B, H, G, S), (B,)
        slots = torch.arange(layer.capacity)
        indexed = slots[None] < idx_end[:, None]
        recent = (slots[None] >= idx_end[:, None]) & (slots[None] <= lengths[:, None])
        keep = (sel & indexed[:, None, None]) | recent[:, None, None]
        assert keep.float().mean() < 0.95  # something was skipped
        mask = keep.reshape(B, -1, 1, layer.capacity)
        ref = attend(q, layer.k, layer.v, mask, scaling=0.125)
        assert torch.allclose(out, ref, atol=1e-6)
    st = layer.stats()
    assert st.bytes_read_per_step < st.bytes_stored  # measured reads: less than the store holds


@pytest.mark.parametrize("method", [Louver(ratio=0.0), Quest(ratio=0.0)], ids=lambda m: m.name)
def test_ratio_zero_equals_full(method, tiny_llama):
    prompts = random_prompts([23, 17, 9])
    ref = run(tiny_llama, Full(), prompts, chunk=7, n_new=6)
    out = run(tiny_llama, method, prompts, chunk=7, n_new=6)
    assert out.tokens == ref.tokens
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-5
    assert out.stats_context.bytes_stored == ref.stats_context.bytes_stored  # no index when reading everything


def test_index_bytes_are_stored_and_reads_are_measured(tiny_llama):
    prompts = random_prompts([60])
    ref = run(tiny_llama, Full(), prompts, n_new=4)
    out = run(tiny_llama, Louver(ratio=0.9, n_subspaces=4, sample_size=16), prompts, n_new=4)
    assert out.stats_context.bytes_full == ref.stats_context.bytes_full
    assert out.stats_context.bytes_stored > ref.stats_context.bytes_stored  # the index is kept on top of K/V
    assert 0 < out.stats_final.bytes_read_per_step


@pytest.mark.parametrize("bits", [1, 5, 10, 11, 16, 31])
def test_parent_ids_pack_into_a_bit_stream(bits):
    ids = torch.randint(0, 2**bits, (2, 3, 4, 77), generator=torch.Generator().manual_seed(bits))
    words = pack_ids(ids, bits)
    assert words.dtype == torch.int32 and words.shape[-1] == math.ceil(77 * bits / 32)
    assert torch.equal(unpack_ids(words, bits, 77), ids)
    assert (id_bits(2**bits), id_bits(2**bits + 1)) == (bits, bits + 1)


def test_packed_parent_ids_are_what_is_stored_and_read(tiny_llama):
    """The store keeps ceil(log2 P) bits per parent id; the gate sees exactly the ids it was built with."""
    prompts = random_prompts([60, 41])
    engine = Engine(copy.deepcopy(tiny_llama), Louver(ratio=0.9, n_subspaces=4, branching=4, sample_size=16))
    state = engine.new_state(2, 80)
    engine.run_segment(state, prompts, [0, 0], chunk=None, want_last=[True, True], last_logits=None)
    state.end_of_context()
    store = state.layers[0]
    bits = store.parent_bits
    assert bits == id_bits(store.centres.shape[3]) < 16
    parent = store.index().parent  # (B, H_kv, S, N)
    for b, n in enumerate((60, 41)):
        assert (parent[b, :, :, :n] >= 0).all() and (parent[b, :, :, n:] == -1).all()
        assert int(parent[b].max()) < store.p_hi
    H, S = store.parent_words.shape[1:3]
    words = sum(math.ceil(n * bits / 32) for n in (60, 41)) * H * S  # the words the indexed keys' ids fill
    assert store._index_stored_bytes("parent_words", store.parent_words, 4) == 4 * words
    read = store._index_read_bytes()  # (B,): packed ids + centres, radii, sample
    elem = store._nominal_size()  # centres, radii and sample count at the nominal dtype (bf16)
    gate = H * S * store.p_hi * (store.centres.shape[4] + 1) * elem + store.sample[0].numel() * elem
    assert torch.allclose(read, torch.tensor([60.0, 41.0], dtype=torch.float64) * H * S * bits / 8 + gate)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        Louver(threshold="oracle")
    with pytest.raises(ValueError, match="branching"):
        Louver(branching=0)
    from harness.models import tiny_config
    from methods.api import ModelSpec

    spec = ModelSpec.from_config(tiny_config("llama"))
    assert any("divide" in r for r in Louver(n_subspaces=7).validate(spec))
    assert any("ratio" in r for r in Quest(ratio=1.0).validate(spec))


# -- index=grid (the fused kernels' gate) -------------------------------------------------------------
from methods.kernels import sparse_attention as sa  # noqa: E402
from methods.louver import FusedLouverGridStore, LouverGridStore, grid_bounds, grid_kth  # noqa: E402


@pytest.mark.parametrize("seed", range(6))
def test_grid_gate_has_no_false_negatives(seed):
    k, g = _keys(seed, aniso=seed % 2 == 0)
    B, H, N, D = k.shape
    dtype = torch.bfloat16 if seed >= 3 else torch.float32
    k = k.to(dtype)  # keys as a store keeps them
    valid = torch.rand(B, N, generator=g) < 0.9
    lo, inv, step = grid_bounds(k[:, :, :200], valid[:, :200])  # later keys fall outside the grid: err grows
    codes, err = sa.grid_encode_reference(k, lo, inv, step)
    kh = lo[:, :, None] + codes.float() * step[:, :, None]
    assert ((k.float() - kh).norm(dim=-1) <= err * (1 + 1e-6)).all()
    q = torch.randn(B, H, 3, D, generator=g) * 2
    M = 64
    kth = grid_kth("budget", [0.05, 0.1, 0.3][seed % 3], M)
    sv = valid[:, None, :M].expand(B, H, M)
    kmax = k.float().norm(dim=-1).amax(-1)
    t, w, thr, qn = sa.grid_gate_params_reference(q, k[:, :, :M], sv, kth, lo, step, kmax, gate_eps=1e-5)
    read = sa.grid_read_reference(w, thr, qn, codes, err)  # (B, H, G, N)
    exact = torch.einsum("bhgd,bhnd->bhgn", q, k.float())
    must = exact >= t[..., None]
    assert must.any() and not (must & ~read).any()
    assert read.float().mean() < 0.7  # and it prunes


def _grid(**kw):
    base = {"ratio": 0.7, "index": "grid", "sample_size": 32, "merge_every": 3}
    return Louver(**{**base, **kw})


def test_grid_store_outputs_attention_over_what_it_reads(tiny_llama):
    """The reference grid store: zero false negatives against the exact scores at every step (merges crossed),
    and the codes of every stored key bound it."""
    prompts = random_prompts([70, 45])
    engine = Engine(copy.deepcopy(tiny_llama), _grid(), prefill_chunk=16)
    state = engine.new_state(2, 100)
    engine.run_segment(state, prompts, [0, 0], chunk=16, want_last=[False, False], last_logits=None)
    state.end_of_context()
    assert all(type(layer) is LouverGridStore for layer in state.layers)
    missed, must_total = [0], [0]
    for layer in state.layers:
        orig = layer._select

        def select(qg, layer=layer, orig=orig):
            sel = orig(qg)
            t, *_ = sa.grid_gate_params_reference(qg, layer.sample, layer.sample_valid, layer.kth, layer.lo,
                                                  layer.step, layer.kmax, gate_eps=1e-5)
            exact = torch.einsum("bhgd,bhnd->bhgn", qg, layer.k.float())
            indexed = torch.arange(layer.capacity)[None] < layer.idx_end[:, None]
            must = (exact >= t[..., None]) & indexed[:, None, None]
            missed[0] += int((must & ~sel).sum())
            must_total[0] += int(must.sum())
            return sel

        layer._select = select
    for step in range(8):
        tok = torch.randint(0, 256, (2, 1))
        pos = torch.tensor([[70 + step], [45 + step]])
        engine.forward(state, tok, pos, torch.ones(2, 1, dtype=torch.bool), logits_at=torch.zeros(2, dtype=torch.long))
    assert must_total[0] > 0 and missed[0] == 0
    layer = state.layers[0]
    assert layer.idx_end.tolist() == [76, 51]  # merged after steps 3 and 6
    for b, n in enumerate(layer.lengths.tolist()):  # every stored key (context, question, decode) is encoded
        kh = layer.lo[b, :, None] + layer.codes[b, :, :n].float() * layer.step[b, :, None]
        assert ((layer.k[b, :, :n] - kh).norm(dim=-1) <= layer.err[b, :, :n] * (1 + 1e-6) + 1e-6).all()
    st = layer.stats()
    assert st.bytes_read_per_step < st.bytes_stored


def _gate_check(layer, seen):
    """Wrap a FusedLouverGridStore's decode: with the kernels' own operands (the threshold kernel, the codes the
    append kernel wrote) every indexed key at or above the threshold passes the gate, and the attention kernel
    books exactly the keys the gate passes."""
    orig = layer._fused_decode

    def decode(q, k, v, valid, scaling):
        read0 = layer.acc[:, 0].clone()
        out = orig(q, k, v, valid, scaling)
        B, H_q, D = q.shape
        H, G = layer.layer.n_kv_heads, layer.layer.n_groups
        w, thr, qn = torch.empty(B, H_q, D), torch.empty(B, H_q), torch.empty(B, H_q)
        sa.grid_gate_params(q, layer.sample, layer.sample_valid, layer.kth, layer.lo, layer.step, layer.kmax,
                            gate_eps=1e-5, w=w, thr=thr, qn=qn)
        qg = q.float().reshape(B, H, G, D)
        t, *_ = sa.grid_gate_params_reference(qg, layer.sample, layer.sample_valid, layer.kth, layer.lo, layer.step,
                                              layer.kmax, gate_eps=1e-5)
        read = sa.grid_read_reference(w.reshape(B, H, G, D), thr.reshape(B, H, G), qn.reshape(B, H, G),
                                      layer.codes, layer.err)
        indexed = torch.arange(layer.capacity)[None] < layer.idx_end[:, None]
        must = (torch.einsum("bhgd,bhnd->bhgn", qg, layer.k.float()) >= t[..., None]) & indexed[:, None, None]
        seen["must"] += int(must.sum())
        seen["missed"] += int((must & ~read).sum())
        booked = layer.acc[:, 0] - read0
        seen["booked"] &= bool(torch.equal(booked, torch.where(valid, (read & indexed[:, None, None]).any(2).sum((1, 2)), 0)))
        return out

    layer._fused_decode = decode


def test_fused_grid_store_gives_the_reference_tokens_logits_and_reads(interpret, tiny_llama):
    """A ragged batch (reference prefill, fused decode; merges after steps 3 and 6): the reference's tokens, logits,
    bytes stored and read; on the device path no key at or above the threshold is missed."""
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                      question=torch.randint(3, 250, (5,), generator=g).tolist()) for n in (50, 33)]
    outs, seen = {}, {"must": 0, "missed": 0, "booked": True}
    for fused in ("off", "on"):
        engine = Engine(copy.deepcopy(tiny_llama), _grid(fused=fused), prefill_chunk=16)
        if fused == "on":
            engine._new_state = engine.new_state

            def new_state(*a, engine=engine, **kw):
                state = engine._new_state(*a, **kw)
                assert all(type(layer) is FusedLouverGridStore for layer in state.layers)
                _gate_check(state.layers[1], seen)
                return state

            engine.new_state = new_state
        outs[fused] = engine.generate(prompts, max_new_tokens=7, return_logits=True)
        assert engine.kernel == ("fused" if fused == "on" else "reference")
    ref, fast = outs["off"], outs["on"]
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for s_ref, s_fast in ((ref.stats_context, fast.stats_context), (ref.stats_final, fast.stats_final)):
        assert s_fast.bytes_stored == s_ref.bytes_stored
        assert s_fast.bytes_read_per_step == s_ref.bytes_read_per_step
    assert ref.stats_final.bytes_read_per_step < ref.stats_final.bytes_stored
    assert seen["must"] > 0 and seen["missed"] == 0 and seen["booked"]


@pytest.mark.slow  # end to end (make test-slow; CI runs it): keeps make test under 5 minutes
def test_fused_grid_on_the_trained_model_gives_the_reference_tokens(interpret):
    """The embedded model on its own task at ratio 0.9 (index=grid): greedy tokens identical, logits within 1e-3."""
    from tests.test_quest_fused import _trained, _trained_prompts

    prompts = _trained_prompts("niah_single", 2, 352, ragged=True)
    outs = {}
    for fused in ("off", "on"):
        engine = Engine(_trained(), _grid(ratio=0.9, fused=fused, merge_every=2), prefill_chunk=512)
        outs[fused] = engine.generate(prompts, max_new_tokens=4, return_logits=True)
    assert outs["on"].tokens == outs["off"].tokens
    for a, b in zip(outs["off"].logits, outs["on"].logits):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)


def test_grid_settings_are_checked(tiny_llama):
    from harness.models import tiny_config
    from methods.api import ModelSpec

    spec = ModelSpec.from_config(tiny_config("llama"))
    assert any("threshold" in r for r in Louver(index="grid", threshold="sample_gap").validate(spec))
    assert Louver(index="grid", n_subspaces=7).validate(spec) == []  # subspaces belong to index=balls
    with pytest.raises(ValueError, match="index"):
        Louver(index="kd")
    engine = Engine(copy.deepcopy(tiny_llama), Louver(index="grid"))
    assert type(engine.new_state(1, 8).layers[0]) is LouverGridStore  # fused=auto: the reference on CPU
    with pytest.raises(ValueError, match="index=balls has no fused kernel"):
        Engine(copy.deepcopy(tiny_llama), Louver(fused="on")).new_state(1, 8)


# -- GPU (pytest -m gpu on the GPU machine) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[300, 300], [300, 170]], ids=["equal", "ragged"])
def test_cuda_graph_louver_grid_gives_the_reference_tokens(tiny_llama, lengths):
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                      question=torch.randint(3, 250, (7,), generator=g).tolist()) for n in lengths]
    outs = {}
    for fused, graph in (("off", False), ("on", False), ("on", True)):
        engine = Engine(copy.deepcopy(tiny_llama).cuda(), _grid(fused=fused, sample_size=256, merge_every=16),
                        prefill_chunk=128, cuda_graph=graph)
        outs[fused, graph] = engine.generate(prompts, max_new_tokens=40, return_logits=True)
        assert engine.graph_error is None
        assert engine.kernel == ("fused" if fused == "on" else "reference")
    ref = outs["off", False]
    for key in (("on", False), ("on", True)):
        assert outs[key].tokens == ref.tokens, key
        for a, b in zip(ref.logits, outs[key].logits):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert outs[key].stats_final.bytes_read_per_step == ref.stats_final.bytes_read_per_step


@pytest.mark.gpu
def test_louver_grid_graph_decode_step_does_not_sync_with_host(tiny_llama):
    engine = Engine(copy.deepcopy(tiny_llama).cuda(), _grid(sample_size=256, merge_every=2))
    state = engine.new_state(2, 128)
    engine.run_segment(state, random_prompts([70, 70]), [0, 0], chunk=None, want_last=[True, True], last_logits=None)
    state.end_of_context()
    assert all(type(layer) is FusedLouverGridStore for layer in state.layers)
    graph_steps_without_sync(engine, state, start=70, steps=5)
    layer = state.layers[0]
    assert layer.lengths.tolist() == [75, 75] and layer.hi == 75 and layer.idx_end.tolist() == [74, 74]
