"""Triton helpers shared by several kernel modules (imported on first use, like every ``_*_triton`` module)."""

import triton
import triton.language as tl


@triton.jit
def rnd(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to the model's dtype (nearest, ties to even) and back: what a torch op in that
    dtype stores. bf16 is rounded with integer operations on the bits, which the compiler cannot fold
    away or fuse into an FMA as it may a ``.to(bf16).to(fp32)`` pair (and which Triton's CPU interpreter,
    which truncates bf16 conversions, computes the same way)."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(dtype).to(tl.float32)
    else:
        return x
