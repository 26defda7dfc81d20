"""Triton kernels of :mod:`harness.kernels.layers` (imported on first use: Triton decides at import time
whether ``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before). Launchers,
references and documentation live in layers.py.

Every kernel rounds where the Hugging Face modules round (each bf16 op of the eager model rounds its
result to the model's dtype), so a fused decode step computes the numbers the module path computes;
``rnd`` (:mod:`methods.kernels._common_triton`) is that rounding."""

import triton
import triton.language as tl

from methods.kernels._common_triton import rnd


@triton.jit
def add_rmsnorm(X, Delta, W, Out, N, eps, sxb, sdb, sob,
                HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``b``: x <- x + delta (in place, rounded), out <- w * rnd(x * rsqrt(mean(x^2) + eps))."""
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    dt: tl.constexpr = X.dtype.element_ty
    x = tl.load(X + b * sxb + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(Delta + b * sdb + offs, mask=ok, other=0.0).to(tl.float32)
        x = rnd(x + d, dt)
        tl.store(X + b * sxb + offs, x.to(dt), mask=ok)
    var = tl.sum(x * x, 0) / N
    y = rnd(x * tl.rsqrt(var + eps), dt)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + b * sob + offs, rnd(w * y, Out.dtype.element_ty).to(Out.dtype.element_ty), mask=ok)


@triton.jit
def rope_inplace(X, Cos, Sin, sxb, sxh, scb, ssb, HALF: tl.constexpr):
    """Head ``h`` of row ``b`` (program (b, h)): x <- rnd(rnd(x * cos) + rnd(rotate_half(x) * sin)),
    rotate_half(x) = (-x[HALF:], x[:HALF]) (the Llama convention)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    dt: tl.constexpr = X.dtype.element_ty
    offs = tl.arange(0, HALF)
    base = X + b * sxb + h * sxh
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    c1 = tl.load(Cos + b * scb + offs).to(tl.float32)
    c2 = tl.load(Cos + b * scb + HALF + offs).to(tl.float32)
    s1 = tl.load(Sin + b * ssb + offs).to(tl.float32)
    s2 = tl.load(Sin + b * ssb + HALF + offs).to(tl.float32)
    y1 = rnd(rnd(x1 * c1, dt) + rnd(-x2 * s1, dt), dt)
    y2 = rnd(rnd(x2 * c2, dt) + rnd(x1 * s2, dt), dt)
    tl.store(base + offs, y1.to(dt))
    tl.store(base + HALF + offs, y2.to(dt))


@triton.jit
def silu_mul(GU, Out, N, sgb, sob, BLOCK: tl.constexpr):
    """out[b, i] = rnd(rnd(silu(gate[b, i])) * up[b, i]); gate = GU[b, :N], up = GU[b, N:2N]."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    dt: tl.constexpr = Out.dtype.element_ty
    g = tl.load(GU + b * sgb + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(GU + b * sgb + N + offs, mask=ok, other=0.0).to(tl.float32)
    a = rnd(g / (1.0 + tl.exp(-g)), dt)
    tl.store(Out + b * sob + offs, rnd(a * u, dt).to(dt), mask=ok)


@triton.jit
def gemv(X, W, Bias, Y, N, K, n_rows, sxb, swn, syb,
         HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """Y[b, n] = sum_k X[b, k] W[n, k] (+ Bias[n]) for a few rows b: program ``pid`` owns BLOCK_N outputs and
    streams its BLOCK_N x K slice of W once (the weight is read once per step, the rows come from L2)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    n_ok = offs_n < N
    b_ok = offs_b < n_rows
    if USE_DOT:
        acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(W + offs_n[:, None] * swn + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            x = tl.load(X + offs_b[:, None] * sxb + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:  # one row: multiply-accumulate on the CUDA cores, one reduction at the end
            x = tl.load(X + offs_k, mask=k_ok, other=0.0)
            acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if USE_DOT:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_b[:, None] * syb + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=b_ok[:, None] & n_ok[None, :])
    else:
        y = tl.sum(acc2, 1)
        if HAS_BIAS:
            y += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, y.to(Y.dtype.element_ty), mask=n_ok)
