"""The quantization family: codecs against plain references, packing, exact byte accounting,
16 bits == full, ratio honouring, batch == single."""

import math

import pytest
import torch

from methods.api import LayerSpec, ModelSpec
from methods.fp8 import Fp8
from methods.full import Full
from methods.kivi import Kivi
from methods.quantizers import (
    RotatedQuantizer,
    TurboQuantizer,
    UniformQuantizer,
    lloyd_max_codebook,
    pack_codes,
    unpack_codes,
)
from methods.quarot import QuaRot
from methods.turboquant import TurboQuantKQV, TurboQuantKV, TurboQuantQKQV
from methods.uniform_int import UniformInt
from tests.helpers import random_prompts, run

QUANT = [UniformInt, Kivi, QuaRot, TurboQuantKV, TurboQuantKQV, TurboQuantQKQV]


def hadamard_matrix(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def minmax_reference(x, bits, clip=1.0):
    """Plain asymmetric min/max round-to-nearest of each row of x (..., G)."""
    lo, hi = x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip
    scale = (hi - lo) / (2**bits - 1)
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_roundtrip_all_widths(bits):
    codes = torch.randint(0, 1 << bits, (2, 3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quarot_codec_matches_reference(bits):
    x = torch.randn(4, 2, 9, 64) * 2
    codec = RotatedQuantizer(UniformQuantizer(bits, 64, 0.95), dim=64, seed=3)
    got = codec.decode_fields(codec.encode_fields(x, meta_dtype=torch.float32), dtype=torch.float32)
    H = hadamard_matrix(64) * codec.signs.float()  # rotate(x) = x @ (H diag(s))^T
    y = x @ H.T
    ref = minmax_reference(y, bits, 0.95) @ H
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()


@pytest.mark.parametrize("mse_bits,qjl", [(1, 0), (3, 0), (4, 0), (2, 64), (0, 64)])
def test_turboquant_codec_matches_reference(mse_bits, qjl):
    x = torch.randn(3, 2, 7, 64) * 5
    q = TurboQuantizer(dim=64, mse_bits=mse_bits, qjl_dim=qjl, seed=5)
    parts = q.encode_fields(x, meta_dtype=torch.float32)
    got = q.decode_fields(parts, dtype=torch.float32)
    norm = x.norm(dim=-1, keepdim=True)
    H = hadamard_matrix(64) * q.signs.float()
    y = (x / norm) @ H.T
    y_mse = torch.zeros_like(y)
    if mse_bits:
        c = torch.tensor(lloyd_max_codebook("gaussian", 64, mse_bits)[0])
        y_mse = c[(y[..., None] - c).abs().argmin(-1)]
    ref_y = y_mse
    if qjl:
        r = y - y_mse
        S = q.sketch.float()
        ref_y = y_mse + math.sqrt(math.pi / 2) / qjl * r.norm(dim=-1, keepdim=True) * (torch.sign(r @ S.T) @ S)
    ref = (ref_y @ H) * norm
    assert torch.allclose(got, ref, atol=1e-4 * float(norm.max())), (got - ref).abs().max()


def test_qjl_inner_products_are_unbiased():
    """Mean error of <q, k~> over random sketches is within 4 standard errors of 0."""
    torch.manual_seed(0)
    k, qv = torch.randn(64), torch.randn(64)
    errs = []
    for seed in range(400):
        q = TurboQuantizer(dim=64, mse_bits=1, qjl_dim=64, seed=seed)
        kt = q.decode_fields(q.encode_fields(k[None], meta_dtype=torch.float32), dtype=torch.float32)[0]
        errs.append(float(kt @ qv - k @ qv))
    e = torch.tensor(errs)
    assert abs(float(e.mean())) < 4 * float(e.std()) / math.sqrt(len(e))


def test_fp8_codec_matches_reference():
    x = torch.randn(2, 2, 5, 32) * 3
    spec = LayerSpec(layer_idx=0, n_layers=1, n_q_heads=2, n_kv_heads=2, head_dim=32)
    store = Fp8().new_layer(spec, batch=2, capacity=8, device="cpu", dtype=torch.float32)
    store._write(torch.arange(5).expand(2, 5), x, x)
    got, _ = store._read(5)
    scale = x.abs().amax(-1, keepdim=True) / 448
    ref = (x / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_kivi_store_matches_reference_and_is_chunking_invariant():
    """Keys: per-channel min/max over groups of G tokens for complete R-blocks; values: per-token
    groups of G channels for all but the last R tokens; the windows are exact."""
    G, R, T, D = 8, 16, 45, 32
    spec = LayerSpec(layer_idx=0, n_layers=1, n_q_heads=2, n_kv_heads=1, head_dim=D)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, D, generator=g) for h in (2, 1, 1))
    method = Kivi(ratio=0.75, group_size=G, residual_length=R)
    reads = []
    for chunks in ([T], [7] * 6 + [3], [1] * T):
        st = method.new_layer(spec, batch=1, capacity=64, device="cpu", dtype=torch.float32)
        o = 0
        for c in chunks:
            st.extend(q[:, :, o:o + c], k[:, :, o:o + c], v[:, :, o:o + c], positions=None,
                      valid=torch.ones(1, c, dtype=torch.bool), scaling=1.0)
            o += c
        reads.append(st._read(T))
    for kk, vv in reads[1:]:
        assert torch.equal(kk, reads[0][0]) and torch.equal(vv, reads[0][1])
    kk, vv = reads[0]
    nq_k, nq_v = T // R * R, T - R
    ref_k = minmax_reference(k[0, 0, :nq_k].reshape(nq_k // G, G, D).transpose(1, 2), 4).transpose(1, 2).reshape(nq_k, D)
    ref_v = minmax_reference(v[0, 0, :nq_v].reshape(nq_v, D // G, G), 4).reshape(nq_v, D)
    assert torch.allclose(kk[0, 0, :nq_k], ref_k, atol=1e-5)
    assert torch.allclose(vv[0, 0, :nq_v], ref_v, atol=1e-5)
    assert torch.equal(kk[0, 0, nq_k:], k[0, 0, nq_k:]) and torch.equal(vv[0, 0, nq_v:], v[0, 0, nq_v:])


# -- byte accounting: what the test computes from bits, groups, dtypes, windows and token counts --
def _const_turbo(D, mse_bits, qjl):
    """Bytes of one TurboQuantizer's constants: signs (int8), centroids and boundaries, sketch (bf16)."""
    cb = 2 * (2**mse_bits + 2**mse_bits - 1) if mse_bits else 0
    return D + cb + 2 * qjl * D


def _per_token_bytes(method, D, b):
    """(bytes per token and kv head, bytes per layer not tied to tokens) at b bits, bf16 metadata."""
    if isinstance(method, UniformInt):
        G = method.group_size
        return 2 * (D * b // 8 + 2 * (D // G) * 2), 0
    if isinstance(method, QuaRot):
        return 2 * (D * b // 8 + 2 * 2), 2 * D
    if isinstance(method, TurboQuantKV):
        return 2 * (D * b // 8 + 2), 2 * _const_turbo(D, b, 0)
    if isinstance(method, TurboQuantKQV):
        return (D * b // 8 + 2) + (D * (b - 1) // 8 + 2 + D // 8 + 2), _const_turbo(D, b, 0) + _const_turbo(D, b - 1, D)
    if isinstance(method, TurboQuantQKQV):
        return 2 * (D * (b - 1) // 8 + 2 + D // 8 + 2), 2 * _const_turbo(D, b - 1, D)
    raise AssertionError(method)


def _kivi_bytes(L, D, b, G, R):
    nq_k, nq_v = L // R * R, max(0, L - R)
    keys = nq_k // G * (D * G * b // 8 + 2 * D * 2) + (L - nq_k) * D * 2
    values = nq_v * (D * b // 8 + 2 * (D // G) * 2) + (L - nq_v) * D * 2
    return keys + values


@pytest.mark.parametrize("method", [
    UniformInt(ratio=0.75), UniformInt(ratio=0.875, group_size=16), QuaRot(ratio=0.8125), QuaRot(ratio=0.5),
    TurboQuantKV(ratio=0.75), TurboQuantKV(ratio=0.875), TurboQuantKQV(ratio=0.75), TurboQuantQKQV(ratio=0.8125),
    Kivi(ratio=0.875, group_size=8, residual_length=16), Kivi(ratio=0.75, group_size=8, residual_length=8),
    Fp8(), Fp8(scale="head"),
], ids=lambda m: f"{m.name}-{m.ratio}")
def test_bytes_stored_matches_formula(tiny_llama, method):
    prompts = random_prompts([23, 17, 9])
    out = run(tiny_llama, method, prompts, chunk=7, n_new=5)
    spec = ModelSpec.from_config(tiny_llama.config)
    D, H, Lyr, B = spec.head_dim, spec.n_kv_heads, spec.n_layers, len(prompts)
    decoded = [len(t) - 1 for t in out.tokens]  # tokens fed back before the last one

    def expected(lengths):
        if isinstance(method, Fp8):
            per = 2 * (D + 2) if method.scale == "token" else 2 * D
            const = 0 if method.scale == "token" else 2 * B * H * 2
            return Lyr * (H * sum(lengths) * per + const)
        b = round(16 * (1 - method.ratio))
        if isinstance(method, Kivi):
            return Lyr * H * sum(_kivi_bytes(L, D, b, method.group_size, method.residual_length) for L in lengths)
        per, const = _per_token_bytes(method, D, b)
        return Lyr * (H * sum(lengths) * per + const)

    ctx = [len(p) for p in prompts]
    assert out.stats_context.bytes_stored == expected(ctx)
    assert out.stats_context.bytes_full == Lyr * H * sum(ctx) * 2 * D * 2
    assert out.stats_final.bytes_stored == expected([c + d for c, d in zip(ctx, decoded)])


@pytest.mark.parametrize("cls", QUANT, ids=lambda c: c.name)
def test_sixteen_bits_reproduces_full(tiny_llama, cls):
    prompts = random_prompts([21, 12])
    ref = run(tiny_llama, Full(), prompts, chunk=5, n_new=4)
    out = run(tiny_llama, cls(ratio=0.0), prompts, chunk=5, n_new=4)
    assert out.tokens == ref.tokens
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    assert out.stats_context.bytes_stored == ref.stats_context.bytes_stored


@pytest.mark.parametrize("method", [Kivi(ratio=0.875, group_size=8, residual_length=8), Fp8(scale="head"),
                                    TurboQuantQKQV(ratio=0.75)], ids=lambda m: m.name)
def test_batch_equals_single(tiny_llama, method):
    prompts = random_prompts([30, 19, 11], seed=4)
    batch = run(tiny_llama, method, prompts, chunk=6, n_new=5)
    for i, p in enumerate(prompts):
        one = run(tiny_llama, method, [p], chunk=6, n_new=5)
        assert one.tokens[0] == batch.tokens[i]
        assert torch.allclose(one.logits[0], batch.logits[i], atol=1e-4)


@pytest.mark.parametrize("cls", [Kivi, QuaRot, TurboQuantKV, TurboQuantKQV], ids=lambda c: c.name)
def test_logit_error_shrinks_with_bits(tiny_llama, cls):
    prompts = random_prompts([40, 33])
    ref = run(tiny_llama, Full(), prompts, chunk=8, n_new=1)
    kw = {"residual_length": 8, "group_size": 8} if cls is Kivi else {}

    def err(bits):
        out = run(tiny_llama, cls(ratio=1 - bits / 16, **kw), prompts, chunk=8, n_new=1)
        return max(float((a - b).abs().max()) for a, b in zip(out.logits, ref.logits))

    e = {b: err(b) for b in (2, 4, 8)}
    assert e[8] < e[4] < e[2], e


def test_ratio_honouring(tiny_llama):
    spec = ModelSpec.from_config(tiny_llama.config)
    assert Fp8(ratio=0.5).validate(spec) == []
    assert any("ratio 0.5 only" in r for r in Fp8(ratio=0.75).validate(spec))
    for cls in (Kivi, QuaRot, TurboQuantKV, TurboQuantKQV):
        assert cls(ratio=0.8125).validate(spec) == [], cls  # 3 bits
        assert any("2.5 bits" in r for r in cls(ratio=0.84375).validate(spec)), cls
    assert Kivi(ratio=0.75, group_size=64, residual_length=128).validate(spec)  # head_dim 32 < group
    reasons = TurboQuantKQV(ratio=0.75, qjl_dim=40).validate(spec)
    assert any("qjl_dim" in r for r in reasons)
    assert any("needs 0..8" in r for r in TurboQuantQKQV(ratio=0.9375, qjl_dim=64).validate(spec))  # 1 bit, m = 2D


def _script_json(capsys, argv):
    import json

    from scripts.experiments import quant_quality

    assert quant_quality.main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_quant_quality_mse_and_qjl(capsys):
    """The acceptance experiments at a smaller size (tolerances of the issue, widened for n)."""
    mse = _script_json(capsys, ["--exp", "turboquant_mse", "--n", "4000"])
    for got, ref in zip(mse["distortion"], [0.3634, 0.1175, 0.0345, 0.0095]):
        assert abs(got / ref - 1) < 0.05, mse
    qjl = _script_json(capsys, ["--exp", "qjl_bias", "--n-pairs", "3000"])
    assert abs(qjl["mean"]) < 3.5 * qjl["stderr"], qjl
    assert abs(qjl["var"] / qjl["var_theory"] - 1) < 0.15, qjl
