"""Triton kernel of :mod:`methods.kernels.append` (imported on first use: Triton decides at import time whether
``@triton.jit`` compiles or interprets, so ``TRITON_INTERPRET`` must be set before)."""

import triton
import triton.language as tl


@triton.jit
def append_decode(Knew, Vnew, K, V, Lens, Seen, Valid, H_kv, s_valid,
                  snb, snh, snd, svnb, svnh, svnd, skb, skh, sks, skd, svb, svh, svs, svd,
                  BLOCK_H: tl.constexpr, D: tl.constexpr):
    """Row ``b`` (one program): K/V of its new token (every kv head) go to slot lengths[b]; then
    lengths[b] and seen[b] advance by valid[b]. One program owns the row, so reading and advancing its
    counters cannot race."""
    b = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    ok = (offs_h < H_kv)[:, None]
    n = tl.load(Lens + b)
    kk = tl.load(Knew + b * snb + offs_h[:, None] * snh + offs_d[None, :] * snd, mask=ok)
    vv = tl.load(Vnew + b * svnb + offs_h[:, None] * svnh + offs_d[None, :] * svnd, mask=ok)
    tl.store(K + b * skb + offs_h[:, None] * skh + n * sks + offs_d[None, :] * skd, kk.to(K.dtype.element_ty), mask=ok)
    tl.store(V + b * svb + offs_h[:, None] * svh + n * svs + offs_d[None, :] * svd, vv.to(V.dtype.element_ty),
             mask=ok)
    add = tl.load(Valid + b * s_valid).to(n.dtype)
    tl.store(Lens + b, n + add)
    tl.store(Seen + b, tl.load(Seen + b) + add)
