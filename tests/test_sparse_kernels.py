"""Sparse-read kernels (methods/kernels/sparse_attention.py) against their torch references: on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``, small shapes) and on the GPU (``gpu`` marker)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

from methods.kernels import sparse_attention as sa  # noqa: E402
from methods.quest import page_scores  # noqa: E402

SHAPES = [  # (B, H_q, H_kv, D, S): GQA group of 3, MHA, MQA with a group of 8
    (2, 6, 2, 32, 70),
    (1, 2, 2, 16, 130),
    (2, 8, 1, 64, 40),
]


def test_kernels_read_no_plain_globals():
    """Compiled Triton reads a module global inside a kernel only if it is a ``tl.constexpr(...)`` instance (the
    interpreter takes anything): a GPU-only compile error the CPU suite would otherwise miss."""
    import types

    import triton.language as tl

    from methods.kernels import _sparse_triton as K

    module = vars(K)
    kernels = [v for v in module.values() if isinstance(getattr(v, "fn", None), types.FunctionType)]  # jit/interp.
    assert len(kernels) >= 8
    for kernel in kernels:
        for name in kernel.fn.__code__.co_names:
            value = module.get(name)
            if value is None or isinstance(value, (types.ModuleType, type)) or callable(value):
                continue
            assert isinstance(value, tl.constexpr), f"{kernel.fn.__name__} reads {name} = {value!r}: use tl.constexpr"


def _data(shape, seed, dtype=torch.float32, device="cpu"):
    B, H_q, H_kv, D, S = shape
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H_q, D, generator=g, device=device).to(dtype)
    k = (torch.randn(B, H_kv, S, D, generator=g, device=device) * torch.linspace(0.2, 2.0, D, device=device)
         + 0.3).to(dtype)
    v = torch.randn(B, H_kv, S, D, generator=g, device=device).to(dtype)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g, device=device)
    lengths[0] = S
    idx_end = (lengths * torch.rand(B, generator=g, device=device) * 0.9).long()
    return q, k, v, lengths, idx_end, g


def _check_attention(shape, gate, seed=0, dtype=torch.float32, device="cpu", tol=1e-5, **config):
    B, H_q, H_kv, D, S = shape
    G = H_q // H_kv
    q, k, v, lengths, idx_end, g = _data(shape, seed, dtype, device)
    for b in range(B):  # past a row's length nothing is read: NaN there must not leak
        k[b, :, int(lengths[b]):] = float("nan")
        v[b, :, int(lengths[b]):] = float("nan")
    acc = torch.zeros(B, 4, dtype=torch.long, device=device)
    valid = torch.ones(B, dtype=torch.bool, device=device)
    valid[-1] = B == 1
    kw = {}
    if gate == "pages":
        ps = 4
        P = -(-S // ps)
        sel = torch.rand(B, H_kv, G, P, generator=g, device=device) < 0.3
        read = sel.repeat_interleave(ps, -1)[..., :S]
        kw = {"bits": sa.page_bits_reference(sel.reshape(B, H_kv * G, P), H_kv, G), "page_size": ps}
    elif gate == "grid":
        codes = torch.randint(0, 256, (B, H_kv, S, D), generator=g, device=device, dtype=torch.uint8)
        err = torch.rand(B, H_kv, S, generator=g, device=device)
        w = torch.randn(B, H_kv, G, D, generator=g, device=device) * 0.01
        qn = torch.rand(B, H_kv, G, generator=g, device=device)
        u = torch.einsum("bhgd,bhsd->bhgs", w, codes.float()) + qn[..., None] * err[:, :, None]
        us = u.sort(-1).values
        thr = (us[..., int(0.8 * S)] + us[..., int(0.8 * S) + 1]) / 2  # a fifth of the keys pass, none at the edge
        read = sa.grid_read_reference(w, thr, qn, codes, err)
        kw = {"codes": codes, "err": err, "w": w.reshape(B, H_q, D), "thr": thr.reshape(B, H_q),
              "qn": qn.reshape(B, H_q)}
    else:
        read = torch.ones(B, H_kv, G, S, dtype=torch.bool, device=device)
    want, n_read = sa.sparse_decode_attention_reference(q, torch.nan_to_num(k), torch.nan_to_num(v), lengths,
                                                        idx_end, read, scaling=D**-0.5)
    got = sa.sparse_decode_attention(q, k, v, lengths, idx_end, scaling=D**-0.5, gate=gate, acc=acc, valid=valid,
                                     **config, **kw)
    assert got.shape == (B, H_q, D)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    book = torch.stack([n_read, (lengths - idx_end) * H_kv, idx_end * H_kv, torch.ones_like(lengths)], 1)
    assert torch.equal(acc, torch.where(valid[:, None], book, 0))


@pytest.mark.parametrize("gate", ["pages", "grid", "dense"])
@pytest.mark.parametrize("shape,config", [(SHAPES[0], {"n_splits": 3, "block_n": 16, "combine_heads": 1}),
                                          (SHAPES[1], {}), (SHAPES[2], {"n_splits": 2, "block_n": 32})], ids=str)
def test_sparse_attention_matches_reference(interpret, shape, config, gate):
    """The interpreter's default (one tile of 256 slots) and small tiles over several ranges (a page of 4 slots
    inside a tile of 16)."""
    _check_attention(shape, gate, **config)


def test_sparse_attention_merges_more_ranges_than_a_combine_chunk(interpret):
    _check_attention(SHAPES[0], "grid", n_splits=5, block_n=16, combine_chunk=2)  # 5 ranges, merged 2 at a time


def test_sparse_attention_with_nothing_indexed_is_dense_attention(interpret):
    from methods.kernels.attention import decode_attention_reference

    q, k, v, lengths, _, _ = _data(SHAPES[0], 3)
    zero = torch.zeros_like(lengths)
    acc = torch.zeros(2, 4, dtype=torch.long)
    bits = torch.zeros(2, 2, 30, dtype=torch.int32)
    got = sa.sparse_decode_attention(q, k, v, lengths, zero, scaling=0.2, gate="pages", acc=acc,
                                     valid=torch.ones(2, dtype=torch.bool), bits=bits, page_size=4)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, lengths, scaling=0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [False, True], ids=["per_head", "group"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quest_scores_and_selection_match_reference(interpret, shape, group):
    B, H_q, H_kv, D, S = shape
    G = H_q // H_kv
    q, k, _, _, _, g = _data(shape, 1)
    P = 37
    kp = torch.randn(B, H_kv, P, 4, D, generator=g)
    kmin, kmax = kp.amin(3), kp.amax(3)
    n_pages = torch.randint(1, P + 1, (B,), generator=g)
    n_pages[0] = P
    kmin[0, :, 5] = kmin[0, :, 3]  # a tie: the lower page wins
    kmax[0, :, 5] = kmax[0, :, 3]
    want = page_scores(q.reshape(B, H_kv, G, D), kmin, kmax)  # (B, H_kv, G, P)
    want = want.masked_fill(torch.arange(P)[None, None, None] >= n_pages[:, None, None, None], float("-inf"))
    want = want.sum(2) if group else want.reshape(B, H_q, P)
    got = sa.quest_page_scores(q, kmin, kmax, n_pages, group=group)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    budget = torch.tensor([max(1, math.ceil(0.3 * n)) for n in range(P + 1)], dtype=torch.int32)
    sel = sa.select_pages_reference(got, n_pages, budget)
    for rank, radix in ((True, 4), (False, 4)):  # counted ranks (few pages), radix search
        bits = sa.quest_select(got, n_pages, budget, n_kv_heads=H_kv, groups=G, rank=rank, radix_bits=radix)
        assert torch.equal(bits, sa.page_bits_reference(sel, H_kv, G))
    assert torch.equal(sel.sum(-1), torch.minimum(budget[n_pages], n_pages)[:, None].expand(B, sel.shape[1]))


def test_selection_handles_ties_and_tiny_budgets(interpret):
    scores = torch.tensor([[[1.0, 3.0, 3.0, 3.0, -2.0, 0.0, 5.0, 3.0]]])
    budget = torch.tensor([0, 1, 1, 2, 3, 3, 3, 3, 3], dtype=torch.int32)
    n_pages = torch.tensor([8])
    for rank, radix in ((True, 4), (False, 4), (False, 2), (False, 1)):  # ranks; radix 16, 4; bisection
        bits = sa.quest_select(scores, n_pages, budget, n_kv_heads=1, groups=1, rank=rank, radix_bits=radix)
        assert bits[0, 0].tolist() == [0, 1, 1, 0, 0, 0, 1, 0]  # 5, then the first two of the tied 3s
        bits = sa.quest_select(scores, torch.tensor([0]), budget, n_kv_heads=1, groups=1, rank=rank,
                               radix_bits=radix)
        assert bits.sum() == 0  # no page: nothing selected


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_grid_gate_params_match_reference(interpret, shape):
    B, H_q, H_kv, D, S = shape
    G = H_q // H_kv
    q, k, _, _, _, g = _data(shape, 2)
    M = 32
    sample = torch.randn(B, H_kv, M, D, generator=g)
    sample_valid = torch.rand(B, H_kv, M, generator=g) < 0.8
    sample_valid[-1, -1] = False  # an empty sample: t = -inf, every key passes
    kth = torch.tensor([max(1, math.ceil(0.1 * m)) for m in range(M + 1)], dtype=torch.int32)
    lo, step = torch.randn(B, H_kv, D, generator=g), torch.rand(B, H_kv, D, generator=g) + 0.01
    kmax = torch.rand(B, H_kv, generator=g) + 1
    t, w_ref, thr_ref, qn_ref = sa.grid_gate_params_reference(q.reshape(B, H_kv, G, D), sample, sample_valid, kth,
                                                             lo, step, kmax, gate_eps=1e-3)
    for method in ("rank", "bisect", "sort"):  # the three ways to the k-th largest sample score
        w, thr, qn = torch.empty(B, H_q, D), torch.empty(B, H_q), torch.empty(B, H_q)
        sa.grid_gate_params(q, sample, sample_valid, kth, lo, step, kmax, gate_eps=1e-3, w=w, thr=thr, qn=qn,
                            method=method)
        torch.testing.assert_close(w, w_ref.reshape(B, H_q, D))
        torch.testing.assert_close(qn, qn_ref.reshape(B, H_q))
        torch.testing.assert_close(thr, thr_ref.reshape(B, H_q), atol=1e-5, rtol=1e-5)
        assert torch.isinf(thr.reshape(B, H_kv, G)[-1, -1]).all()
    # t is the kth[m]-th largest sample score
    s = torch.einsum("bhgd,bhmd->bhgm", q.reshape(B, H_kv, G, D), sample).masked_fill(~sample_valid[:, :, None], -1e30)
    m = sample_valid.sum(-1)
    above = (s >= t[..., None]).sum(-1)
    assert torch.equal(above[m > 0], kth[m].long()[:, :, None].expand_as(above)[m > 0])


def test_append_kernels_match_reference(interpret):
    B, H, D, S, ps = 3, 2, 16, 40, 4
    g = torch.Generator().manual_seed(4)
    state = {"K": torch.randn(B, H, S, D, generator=g), "V": torch.randn(B, H, S, D, generator=g),
             "lengths": torch.tensor([7, 8, 0]), "seen": torch.tensor([7, 8, 0]),
             "idx_end": torch.tensor([4, 4, 0]), "kmin": torch.zeros(B, H, S // ps, D),
             "kmax": torch.zeros(B, H, S // ps, D)}
    valid = torch.tensor([True, True, False])
    fused = {n: t.clone() for n, t in state.items()}
    for step in range(6):
        k, v = torch.randn(2, B, H, D, generator=g)
        sa.quest_append_reference(k, v, *[state[n] for n in ("K", "V", "lengths", "seen")], valid, state["idx_end"],
                                  state["kmin"], state["kmax"], page_size=ps)
        sa.quest_append(k, v, *[fused[n] for n in ("K", "V", "lengths", "seen")], valid, fused["idx_end"],
                        fused["kmin"], fused["kmax"], page_size=ps)
        for n in state:
            assert torch.equal(fused[n], state[n]), (step, n)
    assert state["idx_end"].tolist() == [12, 12, 0] and state["lengths"].tolist() == [13, 14, 0]
    torch.testing.assert_close(state["kmax"][0, :, 2], state["K"][0, :, 8:12].amax(1))
    # grid
    lo, step_ = torch.full((B, H, D), -1.0), torch.full((B, H, D), 2.0 / 255)
    state = {"K": torch.randn(B, H, S, D, generator=g), "V": torch.randn(B, H, S, D, generator=g),
             "lengths": torch.tensor([7, 8, 0]), "seen": torch.tensor([7, 8, 0]), "idx_end": torch.tensor([5, 8, 0]),
             "steps": torch.zeros(B, dtype=torch.long), "codes": torch.zeros(B, H, S, D, dtype=torch.uint8),
             "err": torch.zeros(B, H, S), "kmax": torch.ones(B, H)}
    fused = {n: t.clone() for n, t in state.items()}
    names = ("K", "V", "lengths", "seen")
    for _ in range(7):
        k, v = torch.randn(2, B, H, D, generator=g)
        sa.grid_append_reference(k, v, *[state[n] for n in names], valid, state["idx_end"], state["steps"],
                                 state["codes"], state["err"], lo, 1 / step_, step_, state["kmax"], merge_every=3)
        sa.grid_append(k, v, *[fused[n] for n in names], valid, fused["idx_end"], fused["steps"], fused["codes"],
                       fused["err"], lo, 1 / step_, step_, fused["kmax"], merge_every=3)
        for n in state:
            torch.testing.assert_close(fused[n], state[n], rtol=1e-6, atol=1e-6, msg=n)
    assert state["idx_end"].tolist() == [13, 14, 0]  # merged after step 6
    kf = state["K"][0, :, 7:14]
    kh = lo[0, :, None] + state["codes"][0, :, 7:14].float() * step_[0, :, None]
    assert ((kf - kh).norm(dim=-1) <= state["err"][0, :, 7:14] + 1e-6).all()  # the error bounds the grid cell


# -- GPU (pytest -m gpu on the GPU machine) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate", ["pages", "grid", "dense"])
def test_sparse_attention_on_gpu(gate, dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for shape in [(2, 32, 8, 128, 3000), (3, 6, 2, 64, 700)]:
        _check_attention(shape, gate, dtype=dtype, device="cuda", tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quest_and_grid_gates_on_gpu(dtype):
    for shape in [(2, 32, 8, 128, 3000), (1, 6, 2, 64, 500)]:
        B, H_q, H_kv, D, S = shape
        G = H_q // H_kv
        q, k, _, _, _, g = _data(shape, 5, dtype, "cuda")
        P = S // 16
        kp = k[:, :, : P * 16].reshape(B, H_kv, P, 16, D)
        kmin, kmax = kp.amin(3).contiguous(), kp.amax(3).contiguous()
        n_pages = torch.full((B,), P, device="cuda")
        for group in (False, True):
            got = sa.quest_page_scores(q, kmin, kmax, n_pages, group=group)
            want = page_scores(q.reshape(B, H_kv, G, D), kmin, kmax)
            want = want.sum(2) if group else want.reshape(B, H_q, P)
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
            budget = torch.tensor([max(1, math.ceil(0.1 * n)) for n in range(P + 1)], dtype=torch.int32,
                                  device="cuda")
            bits = sa.quest_select(got, n_pages, budget, n_kv_heads=H_kv, groups=G)
            assert torch.equal(bits, sa.page_bits_reference(sa.select_pages_reference(got, n_pages, budget), H_kv, G))
        M = 256
        sample = k[:, :, :M].contiguous()
        sv = torch.ones(B, H_kv, M, dtype=torch.bool, device="cuda")
        kth = torch.tensor([max(1, math.ceil(0.1 * m)) for m in range(M + 1)], dtype=torch.int32, device="cuda")
        lo, step = k.float().amin(2), (k.float().amax(2) - k.float().amin(2)) / 255
        kmax_n = k.float().norm(dim=-1).amax(-1)
        w, thr, qn = (torch.empty(B, H_q, D, device="cuda"), torch.empty(B, H_q, device="cuda"),
                      torch.empty(B, H_q, device="cuda"))
        _, w_ref, thr_ref, _ = sa.grid_gate_params_reference(q.reshape(B, H_kv, G, D), sample, sv, kth, lo, step,
                                                             kmax_n, gate_eps=1e-5)
        for method in ("rank", "bisect", "sort"):
            sa.grid_gate_params(q, sample, sv, kth, lo, step, kmax_n, gate_eps=1e-5, w=w, thr=thr, qn=qn,
                                method=method)
            torch.testing.assert_close(thr, thr_ref.reshape(B, H_q), atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(w, w_ref.reshape(B, H_q, D))
