"""Fused kernels (methods/kernels) against their torch references: on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, small shapes), and on the GPU (``gpu`` marker). The engine's fast path (fused
store + CUDA-graph decode) must give the plain path's greedy tokens."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.engine import Engine, Prompt
from methods.full import Full
from methods.stores import DenseStore, FusedDenseStore

pytest.importorskip("triton", reason="the fused kernels need Triton (pip install -e '.[dev]' brings it)")

from methods.kernels.attention import (  # noqa: E402
    decode_attention,
    decode_attention_reference,
    prefill_attention,
    prefill_attention_reference,
)

SHAPES = [  # (B, H_q, H_kv, D, S): GQA group of 3 (not a power of two), MHA, MQA
    (2, 6, 2, 32, 50),
    (3, 4, 4, 16, 130),
    (1, 8, 1, 64, 17),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_kernel_matches_reference(interpret, shape):
    B, H_q, H_kv, D, S = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H_q, D, generator=g)
    k, v = torch.randn(2, B, H_kv, S, D, generator=g)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S  # one row over the whole buffer, the others shorter (the rest is never read)
    for b in range(B):  # keys past a row's length are never read: NaN there must not leak
        k[b, :, int(lengths[b]):] = float("nan")
    want = decode_attention_reference(q, k, v, lengths, scaling=D**-0.5)
    for n_splits in (None, 1, 3):  # the default, one range, ranges that end inside a tile and past lengths
        got = decode_attention(q, k, v, lengths, scaling=D**-0.5, n_splits=n_splits)
        assert got.shape == (B, H_q, D)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_prefill_kernel_matches_reference(interpret, shape):
    B, H_q, H_kv, D, S = shape
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, B, H_kv, S + 5, D, generator=g)
    for start, T in ((0, S), (7, S - 7), (S - 3, 3)):
        q = torch.randn(B, H_q, T, D, generator=g)
        got = prefill_attention(q, k, v, start=start, scaling=D**-0.5)
        want = prefill_attention_reference(q, k, v, start=start, scaling=D**-0.5)
        assert got.shape == (B, T, H_q, D)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefill_reference_is_causal_attention():
    """The reference itself: slot-causal attention equals SDPA's causal attention when start = 0."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 9, 16, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(prefill_attention_reference(q, k, v, start=0, scaling=0.25), want, atol=1e-5, rtol=1e-5)


def _prompts(lengths, q_len=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Prompt(context=torch.randint(3, 250, (n,), generator=g).tolist(),
                   question=torch.randint(3, 250, (q_len,), generator=g).tolist()) for n in lengths]


@pytest.mark.parametrize("lengths", [[37, 37], [37, 21]], ids=["equal", "ragged"])
def test_fused_full_gives_the_reference_tokens(interpret, tiny_llama, lengths):
    """Equal lengths run the fused prefill and decode; a ragged batch the reference prefill (padding) and
    the fused decode. Same greedy tokens, logits to 1e-4, same bytes and kept tokens."""
    model = copy.deepcopy(tiny_llama)
    prompts = _prompts(lengths)
    outs = {}
    for fused in (False, True):
        engine = Engine(model, Full(fused="on" if fused else "off"), prefill_chunk=16)
        outs[fused] = engine.generate(prompts, max_new_tokens=5, return_logits=True)
        assert engine.kernel == ("fused" if fused else "reference")
    ref, fast = outs[False], outs[True]
    assert fast.tokens == ref.tokens
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    for s_ref, s_fast in ((ref.stats_context, fast.stats_context), (ref.stats_final, fast.stats_final)):
        assert s_fast.bytes_stored == s_ref.bytes_stored
        assert torch.equal(s_fast.tokens_kept, s_ref.tokens_kept)
    assert (fast.n_forward, fast.attention_calls) == (ref.n_forward, ref.attention_calls)


def test_full_takes_the_fused_path_on_cpu_only_when_asked(tiny_llama, monkeypatch):
    for fused in ("auto", "off"):
        engine = Engine(copy.deepcopy(tiny_llama), Full(fused=fused))
        assert type(engine.new_state(1, 8).layers[0]) is DenseStore and engine.kernel == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        Engine(copy.deepcopy(tiny_llama), Full(fused="on")).new_state(1, 8)
    with pytest.raises(ValueError, match="fused must be one of"):
        Full(fused="yes")


def test_fused_store_refuses_head_dims_the_kernels_lack(interpret):
    from methods.api import LayerSpec

    assert FusedDenseStore.supports(LayerSpec(0, 1, 4, 2, 64)) is None
    assert "head_dim 80" in FusedDenseStore.supports(LayerSpec(0, 1, 4, 2, 80))
    layer = Full().new_layer(LayerSpec(0, 1, 4, 2, 80), batch=1, capacity=4, device="cpu", dtype=torch.float32)
    assert type(layer) is DenseStore
    with pytest.raises(ValueError, match="head_dim 80"):
        Full(fused="on").new_layer(LayerSpec(0, 1, 4, 2, 80), batch=1, capacity=4, device="cpu", dtype=torch.float32)


# -- GPU (run on the GPU machine: pytest -m gpu) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_match_reference_on_gpu(dtype):
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for B, H_q, H_kv, D, S in [(2, 32, 8, 128, 5000), (4, 6, 2, 64, 700), (1, 8, 1, 64, 33)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(B, H_q, D, generator=g, device="cuda", dtype=dtype)
        k, v = torch.randn(2, B, H_kv, S, D, generator=g, device="cuda", dtype=dtype)
        lengths = torch.randint(1, S + 1, (B,), generator=g, device="cuda")
        want = decode_attention_reference(q, k, v, lengths, scaling=D**-0.5)
        torch.testing.assert_close(decode_attention(q, k, v, lengths, scaling=D**-0.5), want, atol=tol, rtol=tol)
        T = min(S, 300)
        qq = torch.randn(B, H_q, T, D, generator=g, device="cuda", dtype=dtype)
        want = prefill_attention_reference(qq, k, v, start=S - T, scaling=D**-0.5)
        got = prefill_attention(qq, k, v, start=S - T, scaling=D**-0.5)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[300, 300], [300, 170]], ids=["equal", "ragged"])
def test_cuda_graph_decode_gives_the_reference_tokens(tiny_llama, lengths):
    model = copy.deepcopy(tiny_llama).cuda()
    prompts = _prompts(lengths)
    outs = {}
    for name, method, graph in (("reference", Full(fused="off"), False), ("fused-eager", Full(), False),
                                ("fused-graph", Full(), True)):
        engine = Engine(model, method, prefill_chunk=128, cuda_graph=graph)
        outs[name] = engine.generate(prompts, max_new_tokens=12, return_logits=True)
        assert engine.graph_error is None
        assert engine.kernel == ("reference" if name == "reference" else "fused")
    for name in ("fused-eager", "fused-graph"):
        assert outs[name].tokens == outs["reference"].tokens, name
        for a, b in zip(outs["reference"].logits, outs[name].logits):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        assert torch.equal(outs[name].stats_final.tokens_kept, outs["reference"].stats_final.tokens_kept)
        assert outs[name].n_forward == outs["reference"].n_forward


@pytest.mark.gpu
def test_graph_decode_step_does_not_sync_with_host(tiny_llama):
    model = copy.deepcopy(tiny_llama).cuda()
    engine = Engine(model, Full())
    state = engine.new_state(2, 64)
    engine.run_segment(state, [p.context for p in _prompts([20, 20])], [0, 0], chunk=None, want_last=[True, True],
                       last_logits=None)
    step = engine._decode_step(state, 2)
    tok = torch.tensor([1, 2], device="cuda")
    pos = torch.tensor([20, 20], device="cuda")
    valid = torch.ones(2, dtype=torch.bool, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(tok, pos, valid)
        step(tok, pos + 1, valid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    step.finish()
    assert state.layers[0].lengths.tolist() == [22, 22] and state.layers[0].hi == 22


def _returns_before_more_code(stmts, where, found):
    """``where`` of every ``if`` that holds a return and is followed by more statements in its block."""
    import ast

    for i, st in enumerate(stmts):
        if isinstance(st, ast.If):
            if i < len(stmts) - 1 and any(isinstance(x, ast.Return) for x in ast.walk(st)):
                found.append(f"{where}:{st.lineno}")
            _returns_before_more_code(st.body, where, found)
            _returns_before_more_code(st.orelse, where, found)
        elif isinstance(st, (ast.For, ast.While, ast.With)):
            _returns_before_more_code(st.body, where, found)
    return found


def test_no_triton_function_returns_early_from_an_if():
    """Triton's compiler goes on past a ``return`` inside a compile-time ``if`` (only the rest of that branch is
    skipped), so code after the ``if`` is compiled too; the interpreter returns as Python does. ``_unpack``'s early
    return compiled its join tree on the direct path's words on the H100 (765db5e, a reshape error no CPU test saw).
    Every ``@triton.jit`` function ends its branches with one return after them instead."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "methods"
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in fn.decorator_list):
                _returns_before_more_code(fn.body, f"{path.relative_to(root.parent)} {fn.name}", found)
    assert not found, f"return inside an if with code after it (use if/else and one return): {found}"


@pytest.mark.slow  # compiles 56 kernels for sm_90 (ptxas included): about 100 s cold, seconds from Triton's cache
@pytest.mark.parametrize("fast16", ["0", "1"])
def test_quant_kernels_compile_for_the_h100(fast16):
    """The quantized-cache kernels (scalar, KIVI, TurboQuant; 2- and 4-bit, head dims 64 and 128, bf16) compile for
    the H100 with no GPU here (tests/compile_check.py): what the interpreter accepts and the compiler refuses shows
    before a GPU call does. ``python -m tests.compile_check`` (no ``--quick``) covers every GPU test layout. Both
    conversions (``KVBENCH_FAST16``): with 1 the scalar and KIVI decode kernels carry its inline PTX (ptxas takes
    it), with 0 none does."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"KVBENCH_FAST16": fast16}
    p = subprocess.run([sys.executable, "-m", "tests.compile_check", "--quick"], env=env, capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parent.parent, timeout=900)
    out = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {"errors": [p.stderr[-3000:]]}
    assert p.returncode == 0 and not out["errors"], out["errors"]
    assert {"quant_attention_triton.append", "kivi_triton.append", "turboquant_triton.prepare"} <= {
        k.lstrip("_") for k in out["kernels"]}
    want = {"quant_attention_triton.decode_split", "kivi_triton.decode_split"} if fast16 == "1" else set()
    assert {k.lstrip("_") for k in out["fast16"]} == want


def _run_ptx(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """A model of the few PTX instructions :func:`_quant_attention_triton._planes_asm` emits (mov, shr, and, prmt,
    sub.rn.bf16x2 on exact values), run on 32-bit registers: the inline PTX of KVBENCH_FAST16 checked on CPU."""
    import struct

    def bf16(bits: int) -> float:
        return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]

    def to_bf16(x: float) -> int:
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        assert bits & 0xFFFF == 0, f"{x} is not exact in bf16"  # the conversion's values are small integers
        return bits >> 16

    regs = dict(inputs)
    val = lambda tok: regs[tok] if tok in regs else int(tok, 0)  # noqa: E731
    for line in asm.replace("{", "").replace("}", "").split("\n"):
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        if op == "mov.b32":
            regs[d] = val(src[0])
        elif op == "shr.b32":
            regs[d] = (val(src[0]) & 0xFFFFFFFF) >> val(src[1])
        elif op == "and.b32":
            regs[d] = val(src[0]) & val(src[1])
        elif op == "prmt.b32":  # default mode: bytes 0-3 of a, 4-7 of b, one selector nibble per result byte
            pool = (val(src[0]) & 0xFFFFFFFF) | ((val(src[1]) & 0xFFFFFFFF) << 32)
            sel = val(src[2])
            regs[d] = sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op == "sub.rn.bf16x2":
            a, b = val(src[0]), val(src[1])
            regs[d] = sum(to_bf16(bf16(a >> s) - bf16(b >> s)) << s for s in (0, 16))
        else:
            raise AssertionError(f"unmodelled PTX instruction {op}")
    return regs


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("sub", [False, True])
def test_fast16_ptx_converts_every_byte(bits, sub):
    """KVBENCH_FAST16's inline PTX (written without a GPU in session 13; the GPU tests hold the kernels to the
    reference): four packed bytes in $(2P) give code plane j of each byte as bf16 128 + code (``sub``: the code)
    in $(2j) (bytes 0, 1: low half first) and $(2j + 1) (bytes 2, 3), for every byte value."""
    import struct

    from methods.kernels._quant_attention_triton import _planes_asm

    planes = 8 // bits
    asm = _planes_asm(bits, sub)

    def as_float(half: int) -> float:
        return struct.unpack("<f", struct.pack("<I", half << 16))[0]

    for word in [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, 0xF0E1D2C3, *range(0, 256 * 257, 257)]:
        regs = _run_ptx(asm, {f"${2 * planes}": word})
        for j in range(planes):
            for byte in range(4):
                code = (((word >> (8 * byte)) & 0xFF) >> (j * bits)) & ((1 << bits) - 1)
                reg = regs[f"${2 * j + byte // 2}"]
                got = as_float((reg >> (16 * (byte % 2))) & 0xFFFF)
                assert got == code + (0 if sub else 128), (hex(word), j, byte, got, code)
