"""KIVI's fused decode (methods/kernels/kivi_attention.py) against its torch references, and the fused KiviStore
against the reference one: on CPU under Triton's interpreter (fp32, small shapes: group 16, ring 32), and on
the GPU (``gpu`` marker: bf16, the 8B shape's heads, the CUDA graph, no host sync)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

from harness.engine import Engine, Prompt  # noqa: E402
from methods.api import LayerSpec  # noqa: E402
from methods.kernels.kivi_attention import (  # noqa: E402
    FIELDS,
    kivi_append,
    kivi_append_reference,
    kivi_decode_attention,
    kivi_decode_attention_reference,
)
from methods.kivi import Kivi, KiviStore  # noqa: E402
from tests.helpers import (  # noqa: E402
    GPU_LENGTHS,
    divergences_not_near_ties,
    gpu_tiny_model,
    graph_steps_without_sync,
    logits_error_until_divergence,
    random_qa_prompts,
)


def _fields(bits, B, H_kv, D, G, R, S, *, dtype=torch.float32, device="cpu", seed=0):
    """Random stored fields of a KIVI cache with S slots (codes uniform, scales positive, rings random)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    kb, vb = bits
    return {
        "k_codes": torch.randint(0, 256, (B, H_kv, S // G, D * G * kb // 8), generator=g, device=device,
                                 dtype=torch.uint8),
        "k_scale": (rnd(B, H_kv, S // G, D).abs() * 0.2).to(dtype), "k_zero": rnd(B, H_kv, S // G, D),
        "k_res": rnd(B, H_kv, R, D),
        "v_codes": torch.randint(0, 256, (B, H_kv, S, D * vb // 8), generator=g, device=device, dtype=torch.uint8),
        "v_scale": (rnd(B, H_kv, S, D // G).abs() * 0.2).to(dtype), "v_zero": rnd(B, H_kv, S, D // G),
        "v_res": rnd(B, H_kv, R, D),
    }


@pytest.mark.parametrize("bits", [(4, 4), (2, 3)], ids=["k4v4", "k2v3"])
def test_decode_kernel_matches_reference(interpret, bits):
    """Rows of every regime: all in the rings (L < R), a packed prefix plus a key block still in its ring, and a
    key window just emptied (L a multiple of R); slots past each row's length hold NaN and are never read."""
    B, H_kv, Gq, D, G, R, S = 3, 2, 3, 32, 16, 32, 160
    f = _fields(bits, B, H_kv, D, G, R, S)
    lengths = torch.tensor([150, 20, 96])
    for b, L in enumerate(lengths.tolist()):  # NaN wherever the store holds nothing for the row
        nq_k, nq_v = L // R * R, max(L - R, 0)
        f["k_scale"][b, :, nq_k // G:] = f["k_zero"][b, :, nq_k // G:] = float("nan")
        f["v_scale"][b, :, nq_v:] = f["v_zero"][b, :, nq_v:] = float("nan")
        live_k = [s % R for s in range(nq_k, L)]
        live_v = [s % R for s in range(nq_v, L)]
        f["k_res"][b, :, [i for i in range(R) if i not in live_k]] = float("nan")
        f["v_res"][b, :, [i for i in range(R) if i not in live_v]] = float("nan")
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H_kv * Gq, D, generator=g)
    kn, vn = torch.randn(2, B, H_kv, D, generator=g)
    kw = dict(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R, scaling=D**-0.5)
    want = kivi_decode_attention_reference(q, *(f[n] for n in FIELDS), lengths, kn, vn, **kw)
    # 3 ranges of 64 slots: ranges that end inside a key group, past a row's packed prefix, or hold nothing
    got = kivi_decode_attention(q, *(f[n] for n in FIELDS), lengths, kn, vn, n_splits=3, **kw)
    assert got.shape == (B, H_kv * Gq, D) and not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


def test_append_kernel_writes_what_the_reference_writes(interpret):
    """One decode step's writes at every kind of position (a value leaving the window, a key window filling,
    both, neither; a finished row writes nothing): bit-identical fields."""
    B, H_kv, D, G, R = 4, 2, 32, 16, 32
    kw = dict(k_bits=3, v_bits=4, group_size=G, residual_length=R)
    f = _fields((3, 4), B, H_kv, D, G, R, 160, seed=3)
    g = torch.Generator().manual_seed(4)
    kn, vn = torch.randn(2, B, H_kv, D, generator=g)
    for lengths, valid in (([31, 63, 100, 5], [True, True, True, True]), ([95, 40, 127, 31], [True, False, True, True])):
        lengths, valid = torch.tensor(lengths), torch.tensor(valid)
        want = {n: t.clone() for n, t in f.items()}
        got = {n: t.clone() for n, t in f.items()}
        kivi_append_reference(kn, vn, want, lengths, valid, **kw)
        kivi_append(kn, vn, got, lengths, valid, **kw)
        for n in FIELDS:
            assert torch.equal(got[n], want[n]), n


def _stores(bits, layer, *, capacity):
    method = {f: Kivi(ratio=1 - bits / 16, group_size=16, residual_length=32, fused=f) for f in ("off", "on")}
    return {f: m.new_layer(layer, batch=2, capacity=capacity, device="cpu", dtype=torch.float32)
            for f, m in method.items()}


def test_fused_store_decode_matches_reference_store(interpret):
    """Store level (one layer, random q/k/v): a prefill chunk, then decode steps through a key window filling
    (slots 30 .. 33) with a row finishing on the way: outputs of valid rows, counters and what is stored (read
    back densely) match the reference store; the fused store says so (kernel, graph_safe)."""
    layer = LayerSpec(0, 1, 6, 2, 32)
    stores = _stores(4, layer, capacity=40)
    assert stores["on"].kernel == "fused" and stores["on"].graph_safe
    assert stores["off"].kernel == "reference" and not stores["off"].graph_safe
    g = torch.Generator().manual_seed(7)
    steps = [(29, [[True] * 29, [True] * 27 + [False] * 2])] + [(1, [[True], [True]])] * 3 + [(1, [[True], [False]])] * 2
    for T, valid in steps:
        q = torch.randn(2, 6, T, 32, generator=g)
        k, v = torch.randn(2, 2, 2, T, 32, generator=g)
        valid = torch.tensor(valid)
        pos = torch.zeros(2, T, dtype=torch.long)
        outs = {f: st.extend(q, k, v, positions=pos, valid=valid, scaling=32**-0.5) for f, st in stores.items()}
        rows = valid[:, 0]
        torch.testing.assert_close(outs["on"][rows], outs["off"][rows], atol=1e-5, rtol=1e-5)
        for name in ("lengths", "seen"):
            assert torch.equal(getattr(stores["on"], name), getattr(stores["off"], name)), name
        assert stores["on"].hi == stores["off"].hi
        n = int(stores["off"].lengths.max())
        for a, b in zip(stores["off"]._read(n), stores["on"]._read(n)):
            for row, L in enumerate(stores["off"].lengths.tolist()):  # bitwise: the codec's arithmetic
                assert torch.equal(a[row, :, :L], b[row, :, :L])
    assert stores["off"].lengths.tolist() == [34, 30]  # row 0 filled its key window at slot 31
    assert stores["on"].stats().bytes_stored == stores["off"].stats().bytes_stored


def test_fused_kivi_gives_the_reference_tokens(interpret, tiny_llama):
    """Through the engine (ragged batch: the padded prefill chunk takes the reference path, decode the kernels;
    row 0's key window fills during decode): same greedy tokens, logits to 1e-4, same bytes."""
    g = torch.Generator().manual_seed(0)
    prompts = [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                      question=torch.randint(3, 250, (2,), generator=g).tolist()) for n in (59, 40)]
    outs = {}
    for fused in ("off", "on"):
        engine = Engine(copy.deepcopy(tiny_llama), Kivi(ratio=0.75, group_size=16, residual_length=32, fused=fused),
                        prefill_chunk=64)
        outs[fused] = engine.generate(prompts, max_new_tokens=4, return_logits=True)
        assert engine.kernel == ("fused" if fused == "on" else "reference")
    ref, fast = outs["off"], outs["on"]
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for a, b in ((ref.stats_context, fast.stats_context), (ref.stats_final, fast.stats_final)):
        assert a.bytes_stored == b.bytes_stored and torch.equal(a.tokens_kept, b.tokens_kept)


def test_fused_kivi_is_refused_with_the_reason(interpret):
    layer = LayerSpec(0, 1, 4, 2, 32)
    assert "group_size 8" in KiviStore.fused_reason(layer, k_bits=4, v_bits=4, group_size=8, residual_length=32)
    with pytest.raises(ValueError, match="group_size 8"):
        Kivi(ratio=0.75, group_size=8, residual_length=32, fused="on").new_layer(layer, batch=1, capacity=8,
                                                                               device="cpu", dtype=torch.float32)
    st = Kivi(ratio=0.75, group_size=16, residual_length=32).new_layer(layer, batch=1, capacity=8, device="cpu",
                                                                     dtype=torch.float32)
    assert st.kernel == "reference" and not st.graph_safe  # auto on CPU: the reference path


# -- GPU (pytest -m gpu on the GPU machine) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(4, 4), (2, 2), (3, 3), (8, 8)], ids=["k4v4", "k2v2", "k3v3", "k8v8"])
@pytest.mark.parametrize("D, Gq", [(128, 4), (64, 3)], ids=["8b", "tiny"])
def test_kivi_kernels_match_reference_on_gpu(bits, D, Gq):
    """The 8B shape and the tiny model's (head dim 64: the shape where the end-to-end 2-bit test parted at 765db5e
    while this test, then at head dim 128 only, passed)."""
    B, H_kv, G, R, S = 3, 8, 32, 128, 5120
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):  # fp32: H100 k8v8 8e-5 on 1 of 12288
        f = _fields(bits, B, H_kv, D, G, R, S, dtype=dtype, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(1)
        q = torch.randn(B, H_kv * Gq, D, generator=g, device="cuda").to(dtype)
        kn, vn = torch.randn(2, B, H_kv, D, generator=g, device="cuda").to(dtype)
        lengths = torch.tensor([S - 7, 1024, 77], device="cuda")
        kw = dict(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R, scaling=D**-0.5)
        want = kivi_decode_attention_reference(q, *(f[n] for n in FIELDS), lengths, kn, vn, **kw)
        got = kivi_decode_attention(q, *(f[n] for n in FIELDS), lengths, kn, vn, **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        valid = torch.tensor([True, True, False], device="cuda")
        for L in ([S - 129, 1023, 77], [S - 128, 127, 5]):
            lengths = torch.tensor(L, device="cuda")
            a = {n: t.clone() for n, t in f.items()}
            b = {n: t.clone() for n, t in f.items()}
            kivi_append_reference(kn, vn, a, lengths, valid, **{k: v for k, v in kw.items() if k != "scaling"})
            kivi_append(kn, vn, b, lengths, valid, **{k: v for k, v in kw.items() if k != "scaling"})
            for n in FIELDS:
                assert torch.equal(a[n], b[n]), (dtype, L, n)


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [0.75, 0.875], ids=["kivi4", "kivi2"])
def test_fused_kivi_gives_the_reference_tokens_on_gpu(ratio):
    """The trained tiny model, 16 prompts (8 equal + 8 ragged lengths), CUDA-graph decode crossing key windows
    (R = 128): fp32 logits to 1e-4 and the same greedy tokens; in bf16 logits to 1e-2 of their scale and at least
    rows parting only at near ties (the kernels keep scale x code in fp32 where the reference rounds to bf16)."""
    prompts = random_qa_prompts(GPU_LENGTHS, q_len=8)
    for dtype in ("float32", "bfloat16"):
        model = gpu_tiny_model(dtype)
        outs = {}
        for fused in ("off", "on"):
            engine = Engine(model, Kivi(ratio=ratio, fused=fused), prefill_chunk=128)
            outs[fused] = engine.generate(prompts, max_new_tokens=40, return_logits=True)
            assert engine.kernel == ("fused" if fused == "on" else "reference") and engine.graph_error is None
        ref, fast = outs["off"], outs["on"]
        if dtype == "float32":
            assert fast.tokens == ref.tokens
            for a, b in zip(ref.logits, fast.logits):
                torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        else:
            assert logits_error_until_divergence(ref, fast) < 4e-2  # bf16 noise: H100 measured 0.010-0.031 (max over all steps)
            # rows part only at near ties (a count of identical rows was too strict for 40 greedy tokens of random
            # prompts: kivi4 on the H100 at 03f98cf kept 9 of 16 with the logits within the bound above)
            bad = divergences_not_near_ties(ref, fast, 1e-1)
            assert not bad, bad
        assert fast.stats_context.bytes_stored == ref.stats_context.bytes_stored


@pytest.mark.gpu
@torch.inference_mode()  # as Engine.generate: the H100 run outside it failed to capture (an inference tensor
# of an earlier generate, updated in place)
def test_fused_kivi_decode_step_is_captured_and_does_not_sync():
    model = gpu_tiny_model("bfloat16")
    engine = Engine(model, Kivi(ratio=0.75, residual_length=32))
    state = engine.new_state(2, 96)
    assert state.graph_safe and state.kernel == "fused"
    ctx = [list(range(3, 33)), list(range(5, 35))]  # 30 tokens: the decode steps fill the key window (slot 31)
    engine.run_segment(state, ctx, [0, 0], chunk=None, want_last=[True, True], last_logits=None)
    graph_steps_without_sync(engine, state, start=30, steps=3)
    assert engine.graph_error is None
    layer = state.layers[0]
    assert layer.lengths.tolist() == [33, 33] and layer.hi == 33


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(4, 4), (2, 2)], ids=["k4v4", "k2v2"])
@pytest.mark.parametrize("D, Gq", [(128, 4), (64, 3)], ids=["8b", "tiny"])
def test_kivi_fast16_matches_reference_on_gpu(bits, D, Gq, monkeypatch):
    """KIVI's DECODE_CONFIG["fast16"] (the bf16 conversion of 4- and 2-bit codes, written without a GPU in session
    13): the reference within the bf16 tolerance of test_kivi_kernels_match_reference_on_gpu, and the output of the
    conversion it replaces but where a zero point's addition rounds in fp32."""
    from methods.kernels import kivi_attention as KA

    B, H_kv, G, R, S = 3, 8, 32, 128, 5120
    f = _fields(bits, B, H_kv, D, G, R, S, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, H_kv * Gq, D, generator=g, device="cuda").to(torch.bfloat16)
    kn, vn = torch.randn(2, B, H_kv, D, generator=g, device="cuda").to(torch.bfloat16)
    lengths = torch.tensor([S - 7, 1024, 77], device="cuda")
    kw = dict(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R, scaling=D**-0.5)
    want = kivi_decode_attention_reference(q, *(f[n] for n in FIELDS), lengths, kn, vn, **kw)
    KA._env_config()  # the environment's config first, then this test's
    outs = []
    for fast in (False, True):
        monkeypatch.setitem(KA.DECODE_CONFIG, "fast16", fast)
        outs.append(kivi_decode_attention(q, *(f[n] for n in FIELDS), lengths, kn, vn, **kw))
    off, on = outs
    torch.testing.assert_close(on.float(), want.float(), atol=2e-2, rtol=2e-2)
    diff = (on.float() - off.float()).abs()
    assert float(diff.max()) <= 2e-2 and float((diff == 0).float().mean()) >= 0.99, (
        float(diff.max()), float((diff == 0).float().mean()))
