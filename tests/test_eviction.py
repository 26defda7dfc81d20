"""Eviction family: budget arithmetic, the ragged store, scorers against naive references."""

from fractions import Fraction

import pytest
import torch

from harness.models import tiny_config
from methods.api import ModelSpec
from methods.eviction import H2O, VATP, AdaKV, KNorm, PyramidKV, RandomEviction, SnapKV
from methods.full import Full
from methods.ragged import segment_attend
from methods.selectors import (
    adakv_budgets,
    attention_mass,
    keep_count,
    keep_count_t,
    leave_block_out,
    pool_scores,
    protect_mask,
    pyramid_budgets,
    window_attention,
)
from methods.stores import attend
from methods.value_aware import ValueAware
from tests.helpers import prefill, random_prompts, run

RATIOS = (0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99)
SMALL = dict(window=4, block_size=4)  # value_aware on short prompts


def methods_at(ratio):
    return [RandomEviction(ratio=ratio), KNorm(ratio=ratio), H2O(ratio=ratio), SnapKV(ratio=ratio, window=4),
            PyramidKV(ratio=ratio, window=4), AdaKV(ratio=ratio, window=4), VATP(ratio=ratio),
            VATP(ratio=ratio, support="window", window=4), ValueAware(ratio=ratio, **SMALL),
            ValueAware(ratio=ratio, support="decode_queries", rescore_every=2, **SMALL)]


# -- budget arithmetic -------------------------------------------------------------------------------
def test_keep_count_is_exact_round_half_up_over_a_grid():
    for r in RATIOS:
        keep = Fraction(1) - Fraction(str(r))
        ns = torch.arange(0, 600)
        t = keep_count_t(ns, r).tolist()
        for n in range(600):
            exact = int(n * keep + Fraction(1, 2)) if n else 0  # floor(n (1 - r) + 1/2)
            want = min(n, max(1, exact)) if n else 0
            assert keep_count(n, r) == want == t[n], (n, r)
    assert keep_count(10, 0.9) == 1 and int(10 * (1 - 0.9)) == 0  # the off-by-one the function avoids
    assert keep_count(1000, 0.7) == 300 and keep_count(7, 0.5) == 4 and keep_count(1, 0.99) == 1
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_count(10, 1.0)


def test_pyramid_budgets_sum_to_the_uniform_total():
    for n in (17, 64, 100, 513, 2048):
        for r in RATIOS:
            C = keep_count(n, r)
            for L, w, beta in ((4, 8, 20.0), (32, 32, 20.0), (3, 0, 2.0), (1, 4, 20.0)):
                b = pyramid_budgets(n, C, n_layers=L, window=w, beta=beta)
                assert sum(b) == L * C and all(0 <= x <= n for x in b), (n, r, L, b)
                if C - w > 0 and 2 * (C - w) <= n - w:  # no clipping: non-increasing with depth
                    assert b == sorted(b, reverse=True)
    # the formula itself: C=100, w=20 -> min 80/20 = 4, max 156; L=5 -> 156, 118, 80, 42, 4 (+ w)
    assert pyramid_budgets(1000, 100, n_layers=5, window=20, beta=20) == [176, 138, 100, 62, 24]


def test_adakv_budgets_against_naive_pooled_topk():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, H, S = 2, 4, 30
        scores = torch.rand(B, H, S, generator=g)
        n = torch.tensor([30, 21])
        scores[1, :, 21:] = float("-inf")
        C = torch.tensor([keep_count(30, 0.6), keep_count(21, 0.6)])
        prot = protect_mask(n, C[:, None].expand(B, H), n_slots=S, n_sink=1, window=2)
        got = adakv_budgets(scores, C, prot, alpha=0.2)
        for b in range(B):
            floor = int(prot[b, 0].sum()) + int(0.2 * int(C[b]))
            chosen = torch.zeros(H, S, dtype=torch.bool)
            for h in range(H):  # safeguard: protected + own top
                own = scores[b, h].masked_fill(prot[b, h], float("inf")).argsort(descending=True)[:floor]
                chosen[h, own] = True
            rest = scores[b].masked_fill(chosen, float("-inf")).flatten()
            k = H * int(C[b]) - H * floor
            top = sorted(range(H * S), key=lambda i: -float(rest[i]))[:k]
            want = chosen.sum(1) + torch.bincount(torch.tensor(top, dtype=torch.long) // S, minlength=H)
            assert got[b].tolist() == want.tolist()
            assert int(got[b].sum()) == H * int(C[b]) and bool((got[b] >= floor).all())


# -- scorers against slow naive references -----------------------------------------------------------
def _naive_probs(q, k, allowed, scaling):
    """q (D,), k (S, D), allowed (S,) -> softmax over allowed keys (0 elsewhere)."""
    logits = torch.tensor([float(q @ k[j]) * scaling if allowed[j] else float("-inf") for j in range(k.shape[0])])
    return torch.softmax(logits, 0)


def test_window_attention_and_attention_mass_match_naive_loops():
    g = torch.Generator().manual_seed(1)
    B, H_q, H_kv, S, D, W = 2, 4, 2, 12, 8, 3
    q = torch.randn(B, H_q, S, D, generator=g)
    k = torch.randn(B, H_kv, S, D, generator=g)
    n = torch.tensor([12, 9])
    sc = D**-0.5
    win_slot = torch.tensor([[9, 10, 11], [-1, 7, 8]])
    q_win = torch.stack([q[b, :, win_slot[b].clamp(min=0)] for b in range(B)])  # (B, H_q, W, D)
    got = window_attention(q_win, win_slot, k, n, scaling=sc)
    vis = torch.zeros(B, 1, S, S, dtype=torch.bool)
    for b in range(B):
        vis[b, 0] = torch.tril(torch.ones(S, S, dtype=torch.bool)) & (torch.arange(S) < n[b])[None]
        vis[b, 0, int(n[b]):] = False
    mass = attention_mass(q, k, vis, scaling=sc, chunk=5)
    for b in range(B):
        for h in range(H_q):
            acc, cnt = torch.zeros(S), 0
            for w in range(W):
                s = int(win_slot[b, w])
                if s < 0:
                    continue
                acc += _naive_probs(q_win[b, h, w], k[b, h // 2], [j <= s and j < n[b] for j in range(S)], sc)
                cnt += 1
            assert torch.allclose(got[b, h], acc / cnt, atol=1e-6)
            col = torch.zeros(S)
            for t in range(int(n[b])):
                col += _naive_probs(q[b, h, t], k[b, h // 2], [j <= t for j in range(S)], sc)
            assert torch.allclose(mass[b, h], col, atol=1e-5)


def test_leave_block_out_matches_recomputing_the_output():
    g = torch.Generator().manual_seed(2)
    B, H_q, H_kv, S, D, bs = 1, 2, 1, 10, 4, 3
    a = torch.softmax(torch.randn(B, H_q, S, generator=g), -1)
    v = torch.randn(B, H_kv, S, D, generator=g)
    blocks = (torch.arange(S) // bs).expand(B, H_kv, S)
    A, dO = leave_block_out(a, v, blocks, 4)
    for h in range(H_q):
        o = (a[0, h, :, None] * v[0, 0]).sum(0)
        for blk in range(4):
            keep = blocks[0, 0] != blk
            aa = a[0, h] * keep
            o2 = (aa[:, None] * v[0, 0]).sum(0) / aa.sum()
            assert abs(float(A[0, h, blk]) - float(a[0, h, ~keep].sum())) < 1e-6
            assert abs(float(dO[0, h, blk]) - float((o - o2).norm())) < 1e-5


def test_pooling_matches_naive_windows():
    x = torch.randn(1, 2, 11)
    for how in ("max", "avg"):
        got = pool_scores(x, kernel=5, how=how)
        for h in range(2):
            for i in range(11):
                win = [float(x[0, h, j]) for j in range(i - 2, i + 3) if 0 <= j < 11]
                want = max(win) if how == "max" else sum(win) / 5  # avg counts the zero padding (SnapKV)
                assert abs(float(got[0, h, i]) - want) < 1e-6


def test_segment_attention_equals_dense_masked_attention():
    g = torch.Generator().manual_seed(3)
    B, H_kv, G, D = 2, 3, 2, 8
    sizes = torch.tensor([5, 1, 7, 3, 9, 2])
    offsets = torch.cumsum(sizes, 0) - sizes
    N = int(sizes.sum())
    k, v = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    q = torch.randn(B, H_kv * G, 1, D, generator=g)
    seg = torch.repeat_interleave(torch.arange(B * H_kv), sizes)
    visible = torch.rand(N, generator=g) > 0.3
    visible[offsets] = True  # every segment sees a slot
    out, probs = segment_attend(q, k, v, seg, sizes, visible, n_kv_heads=H_kv, scaling=0.3)
    S = int(sizes.max())  # dense reference: pad each segment, mask what is invisible
    kd, vd = torch.zeros(B * H_kv, S, D), torch.zeros(B * H_kv, S, D)
    mask = torch.zeros(B * H_kv, S, dtype=torch.bool)
    for s in range(B * H_kv):
        o, z = int(offsets[s]), int(sizes[s])
        kd[s, :z], vd[s, :z], mask[s, :z] = k[o : o + z], v[o : o + z], visible[o : o + z]
    ref = attend(q, kd.view(B, H_kv, S, D), vd.view(B, H_kv, S, D), mask.view(B, H_kv, 1, S), scaling=0.3)
    assert out.shape == (B, 1, H_kv * G, D)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(probs.sum(0), torch.ones(G) * B * H_kv, atol=1e-5)


# -- the store ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", methods_at(0.6), ids=lambda m: m.name + str(m.params().get("support", "")))
def test_kept_counts_equal_the_budget_function_and_memory_is_physical(method, tiny_llama):
    prompts = random_prompts([40, 23, 9])
    engine, state = prefill(tiny_llama, method, prompts)
    spec = ModelSpec.from_config(tiny_llama.config)
    H = spec.n_kv_heads
    plans = [layer.method.plan(layer.score_input()) for layer in state.layers]
    state.end_of_context()
    per_layer = []
    for layer, sel in zip(state.layers, plans):
        keep, budget = sel.keep, sel.budget
        kept = layer.tokens_kept()  # (B, H)
        assert torch.equal(kept, keep.sum(-1)) and torch.equal(kept, budget)
        assert layer.k.dim() == 2 and layer.k.shape[0] == int(layer.sizes.sum())  # flat (N, D)
        assert bool((layer.sizes - kept.reshape(-1) == layer.capacity - layer.hi).all())  # kept + reserve per head
        assert all(t.dim() <= 2 for t in vars(layer).values() if isinstance(t, torch.Tensor))  # prefill buffer gone
        per_layer.append(kept)
    total = torch.stack(per_layer).sum(0)  # (B, H) summed over layers
    want = torch.tensor([keep_count(len(p), 0.6) for p in prompts])[:, None] * spec.n_layers
    if isinstance(method, AdaKV):  # heads differ, each layer's heads sum to H x budget
        for kept in per_layer:
            assert kept.sum(1).tolist() == [H * keep_count(len(p), 0.6) for p in prompts]
    else:
        for kept in per_layer if not isinstance(method, PyramidKV) else []:
            assert kept.tolist() == [[keep_count(len(p), 0.6)] * H for p in prompts]
        assert torch.equal(total, want.expand(-1, H))
    stats = state.stats()
    assert stats.bytes_stored < 0.5 * stats.bytes_full
    layer = state.layers[0]
    dense = len(prompts) * H * layer.capacity * 2 * spec.head_dim * 2 * spec.n_layers  # a dense store, bf16
    assert stats.bytes_allocated < 0.75 * dense  # kept + reserve per head, not the prefill capacity


def test_adakv_is_physically_ragged(tiny_llama):
    prompts = random_prompts([64])
    _, state = prefill(tiny_llama, AdaKV(ratio=0.75, window=4, alpha_safeguard=0.0), prompts)
    state.end_of_context()
    layer = state.layers[0]
    kept = layer.tokens_kept()[0]
    assert len(set(kept.tolist())) > 1, "the heads should get different budgets on a random model"
    assert torch.equal(layer.sizes, kept + layer.capacity - layer.hi)  # each head's segment is its own size


@pytest.mark.parametrize("method", [SnapKV(ratio=0.6, window=4), AdaKV(ratio=0.7, window=4), H2O(ratio=0.5),
                                    ValueAware(ratio=0.5, projection="dilate", **SMALL)], ids=lambda m: m.name)
def test_decode_equals_dense_attention_with_evicted_tokens_masked(method, tiny_llama):
    prompts = random_prompts([30, 19])
    engine, state = prefill(tiny_llama, method, prompts)
    layer = state.layers[0]
    keep = method.plan(layer.score_input()).keep  # (B, H, S)
    k_all, v_all = layer.k[:, :, : layer.hi].clone(), layer.v[:, :, : layer.hi].clone()
    state.end_of_context()
    g = torch.Generator().manual_seed(4)
    B, H, S, D = k_all.shape
    H_q = state.layers[0].layer.n_q_heads
    q, k, v = torch.randn(B, H_q, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    with torch.inference_mode():  # as the engine calls it
        out = layer.extend(q, k, v, positions=torch.tensor([[30], [19]]), valid=torch.ones(B, 1, dtype=torch.bool),
                           scaling=D**-0.5)
    mask = torch.cat([keep, torch.ones(B, H, 1, dtype=torch.bool)], dim=2)[:, :, None]  # (B, H, 1, S + 1)
    ref = attend(q, torch.cat([k_all, k], 2), torch.cat([v_all, v], 2), mask, scaling=D**-0.5)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("method", methods_at(0.0), ids=lambda m: m.name + str(m.params().get("support", "")))
def test_ratio_zero_equals_full(method, tiny_llama):
    prompts = random_prompts([23, 17, 9])
    questions = random_prompts([3, 5, 2], seed=5)
    ref = run(tiny_llama, Full(), prompts, chunk=7, questions=questions, n_new=4)
    out = run(tiny_llama, method, prompts, chunk=7, questions=questions, n_new=4)
    assert out.tokens == ref.tokens
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits)) <= 1e-5
    assert torch.equal(out.stats_final.tokens_kept, ref.stats_final.tokens_kept)


def test_h2o_never_exceeds_its_budget_during_decode(tiny_llama):
    prompts = random_prompts([40, 25])
    questions = random_prompts([5, 3], seed=2)
    method = H2O(ratio=0.5)
    engine, state = prefill(tiny_llama, method, prompts, extra=20)
    state.end_of_context()
    engine.run_segment(state, questions, [40, 25], chunk=None, want_last=[True, True], last_logits=None)
    seen = [45, 28]
    L = len(state.layers)
    evicted_positions = set()
    for step in range(12):
        for b, n in enumerate(seen):
            budget = keep_count(n, 0.5)
            assert state.stats().tokens_kept[b].tolist() == [L * budget] * 2, (step, b)
        tok = torch.randint(0, 256, (2, 1))
        pos = torch.tensor([[s] for s in seen])
        engine.forward(state, tok, pos, torch.ones(2, 1, dtype=torch.bool), logits_at=torch.zeros(2, dtype=torch.long))
        seen = [s + 1 for s in seen]
        layer = state.layers[0]
        occ, _, _ = layer._occupied()
        evicted_positions |= set(range(seen[0])) - set(layer.pos[occ].tolist())
    assert evicted_positions, "h2o should evict during decode"
    assert state.layers[0].k.shape[0] == int(state.layers[0].sizes.sum())  # no growth: allocated once


def test_value_aware_decode_support_rescores_within_budget(tiny_llama):
    prompts = random_prompts([48])
    method = ValueAware(ratio=0.5, support="decode_queries", rescore_every=3, **SMALL)
    engine, state = prefill(tiny_llama, method, prompts)
    state.end_of_context()
    assert state.stats().tokens_kept[0].tolist() == [len(state.layers) * 24] * 2
    for step in range(7):
        engine.forward(state, torch.tensor([[7]]), torch.tensor([[48 + step]]), torch.ones(1, 1, dtype=torch.bool),
                       logits_at=torch.zeros(1, dtype=torch.long))
        kept = state.layers[0].tokens_kept()[0]
        budget = keep_count(48 + step + 1, 0.5)
        assert bool((kept <= budget + 2).all()), (step, kept)
        if (step + 1) % 3 == 0:
            assert kept.tolist() == [budget] * 2


def test_unknown_knobs_say_what_to_use():
    with pytest.raises(ValueError, match="projection"):
        ValueAware(projection="blocks")
    with pytest.raises(ValueError, match="pooling"):
        SnapKV(pooling="mean")
    reasons = SnapKV(ratio=1.0).validate(ModelSpec.from_config(tiny_config("llama")))
    assert any("[0, 1)" in r for r in reasons)


def test_observation_window_holds_the_last_queries_of_each_row(tiny_llama):
    prompts = random_prompts([30, 7, 19])
    _, state = prefill(tiny_llama, SnapKV(ratio=0.5, window=6), prompts, chunk=4)
    for layer in state.layers:
        assert layer.win_slot.tolist() == [list(range(24, 30)), [-1, 0, 1, 2, 3, 4, 5, 6][-6:], list(range(13, 19))]
    _, whole = prefill(tiny_llama, SnapKV(ratio=0.5, window=6), prompts, chunk=None)
    for a, b in zip(state.layers, whole.layers):  # chunking changes nothing: same queries in the window
        assert torch.allclose(a.win_q[0], b.win_q[0], atol=1e-5)
