"""Quantizers: pure-tensor encode / decode of vectors along their last axis, plus bit packing.

Codes are physically packed into uint8 (two 4-bit or four 2-bit codes a byte); a store keeps the
packed bytes, never the dequantized values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PACKABLE_BITS = (1, 2, 4, 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) along the last axis into bytes.

    codes (..., N) uint8 -> (..., N * bits // 8) uint8; element i of a byte group sits in bits
    [i*bits, (i+1)*bits) of its byte (little-endian within the byte).
    """
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    *lead, n = codes.shape
    if n % per:
        raise ValueError(f"{n} codes cannot be packed {per} a byte")
    c = codes.to(torch.uint8).reshape(*lead, n // per, per)  # (..., N/per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
    return (c << shifts).sum(-1, dtype=torch.uint8)  # (..., N/per); fields are disjoint, sum == or


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (..., M) uint8 -> (..., M * 8 // bits) uint8."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
    mask = (1 << bits) - 1
    c = (packed[..., None] >> shifts) & mask  # (..., M, per)
    return c.reshape(*packed.shape[:-1], -1)


@dataclass(frozen=True)
class UniformQuantizer:
    """Asymmetric (min/max) uniform INT-``bits`` quantization in groups of ``group_size``
    consecutive elements of the last axis; one scale and one zero point (the group minimum) per
    group, both stored in ``meta_dtype``. Codes are computed against the *stored* (rounded)
    scale and zero point, so decode uses exactly what was stored."""

    bits: int
    group_size: int

    def __post_init__(self) -> None:
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"bits={self.bits}: supported widths are {PACKABLE_BITS}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def check_dim(self, dim: int) -> list[str]:
        """Reasons a last axis of ``dim`` elements cannot be quantized ([] = ok)."""
        reasons = []
        if dim % self.group_size:
            reasons.append(f"head_dim {dim} is not a multiple of group_size {self.group_size}")
        if (dim * self.bits) % 8:
            reasons.append(f"head_dim {dim} x {self.bits} bits does not fill whole bytes")
        return reasons

    def encode(self, x: Tensor, *, meta_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., D) -> codes (..., D*bits/8) uint8, scale (..., D/G), zero (..., D/G)."""
        *lead, D = x.shape
        G = self.group_size
        xg = x.float().reshape(*lead, D // G, G)  # (..., D/G, G)
        lo = xg.amin(-1)  # (..., D/G)
        hi = xg.amax(-1)
        levels = (1 << self.bits) - 1
        scale = ((hi - lo) / levels).to(meta_dtype)  # (..., D/G)
        zero = lo.to(meta_dtype)  # (..., D/G)
        s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]  # (..., D/G, 1)
        q = torch.round((xg - zero.float()[..., None]) / s).clamp_(0, levels)  # (..., D/G, G)
        codes = pack_codes(q.to(torch.uint8).reshape(*lead, D), self.bits)  # (..., D*bits/8)
        return codes, scale, zero

    def decode(self, codes: Tensor, scale: Tensor, zero: Tensor, *, dtype: torch.dtype) -> Tensor:
        """Inverse of :meth:`encode`: -> (..., D) in ``dtype``."""
        q = unpack_codes(codes, self.bits)  # (..., D)
        *lead, D = q.shape
        G = self.group_size
        qg = q.reshape(*lead, D // G, G).float()  # (..., D/G, G)
        x = qg * scale.float()[..., None] + zero.float()[..., None]
        return x.reshape(*lead, D).to(dtype)

    def bits_per_element(self, meta_bits: int) -> float:
        """Average stored bits per element, scale and zero point included."""
        return self.bits + 2 * meta_bits / self.group_size
