"""Quantizers: pure-tensor encode / decode of vectors along their last axis, plus bit packing.

Codes are physically packed into uint8 (two 4-bit or four 2-bit codes a byte); a store keeps the
packed bytes, never the dequantized values.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) along the last axis into bytes, as one little-endian
    bit stream: bit j of code i is bit (i*bits + j) % 8 of byte (i*bits + j) // 8. For 1, 2 and 4
    bits this is ``8 // bits`` codes a byte, code i of a byte in bits [i*bits, (i+1)*bits).

    codes (..., N) uint8 -> (..., N * bits // 8) uint8; N * bits must be a multiple of 8.
    """
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits={bits}: packable widths are {PACKABLE_BITS}")
    if bits == 8:
        return codes.to(torch.uint8)
    *lead, n = codes.shape
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    c = codes.to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        c = c.reshape(*lead, n // per, per)  # (..., N/per, per)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # (per,)
        return (c << shifts).sum(-1, dtype=torch.uint8)  # (..., N/per); fields are disjoint, sum == or
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)  # (bits,)
    stream = ((c[..., None] >> shifts) & 1).reshape(*lead, n * bits // 8, 8)  # (..., M, 8) bits
    return (stream << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(-1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: (..., M) uint8 -> (..., M * 8 // bits) uint8."""
    if bits == 8:
        return packed
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # (per,)
        mask = (1 << bits) - 1
        c = (packed[..., None] >> shifts) & mask  # (..., M, per)
        return c.reshape(*packed.shape[:-1], -1)
    *lead, m = packed.shape
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1  # (..., M, 8)
    stream = stream.reshape(*lead, m * 8 // bits, bits)  # (..., N, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)


def div_exact(x: Tensor, d: float) -> Tensor:
    """x / d correctly rounded on every device. PyTorch's CUDA division by a Python scalar multiplies by the
    reciprocal (one ulp off for d = 15 or 448), its CPU division does not; the fused quantize kernels divide
    exactly (``tl.math.div_rn``). Dividing by a 0-dim tensor of x's device takes the true division on both,
    so references and kernels agree bit for bit on CPU and GPU (tests/test_quant_kernels.py)."""
    return x / torch.full((), d, dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class UniformQuantizer:
    """Asymmetric (min/max) uniform INT-``bits`` quantization in groups of ``group_size``
    consecutive elements of the last axis; one scale and one zero point (the group minimum) per
    group, both stored in ``meta_dtype``. Codes are computed against the *stored* (rounded)
    scale and zero point, so decode uses exactly what was stored.

    ``clip_ratio`` < 1 shrinks the range to [clip * min, clip * max] before computing the scale
    (QuaRot's asymmetric clipping); values outside saturate at the end codes."""

    bits: int
    group_size: int
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.bits not in PACKABLE_BITS:
            raise ValueError(f"bits={self.bits}: supported widths are {PACKABLE_BITS}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

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
        lo = xg.amin(-1) * self.clip_ratio  # (..., D/G)
        hi = xg.amax(-1) * self.clip_ratio
        levels = (1 << self.bits) - 1
        scale = div_exact(hi - lo, levels).to(meta_dtype)  # (..., D/G)
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

    # -- the codec interface of methods.stores.CodecStore ----------------------------------------
    def fields(self, dim: int) -> dict[str, tuple[int, torch.dtype | None]]:
        """Per-token stored fields: name -> (last-axis size, dtype; None = the meta dtype)."""
        return {"codes": (dim * self.bits // 8, torch.uint8), "scale": (dim // self.group_size, None),
                "zero": (dim // self.group_size, None)}

    def encode_fields(self, x: Tensor, *, meta_dtype: torch.dtype) -> dict[str, Tensor]:
        codes, scale, zero = self.encode(x, meta_dtype=meta_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode_fields(self, parts: dict[str, Tensor], *, dtype: torch.dtype) -> Tensor:
        return self.decode(parts["codes"], parts["scale"], parts["zero"], dtype=dtype)

    def kernel_layout(self, dim: int) -> dict:
        """What the fused kernels read (methods.kernels.quant_attention, family ``scalar``)."""
        return {"kernel": "scalar", "fmt": "int", "bits": self.bits, "group": self.group_size,
                "clip": float(self.clip_ratio)}


# -- FP8 ----------------------------------------------------------------------------------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_encode(x: Tensor, scale: Tensor) -> Tensor:
    """x (..., D) / scale (..., 1) -> e4m3 codes (..., D) as uint8 bytes (saturating at +-448)."""
    y = (x.float() / scale.float().clamp_min(torch.finfo(torch.float32).tiny)).clamp(-FP8_MAX, FP8_MAX)
    return y.to(torch.float8_e4m3fn).view(torch.uint8)


def fp8_decode(codes: Tensor, scale: Tensor, *, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`fp8_encode`: codes (..., D) uint8, scale (..., 1) -> (..., D) in ``dtype``."""
    return (codes.view(torch.float8_e4m3fn).float() * scale.float()).to(dtype)


@dataclass(frozen=True)
class Fp8TokenQuantizer:
    """FP8 e4m3 with one scale per vector (token and kv head): scale = absmax / 448, stored in the
    meta dtype; codes are computed against the stored scale."""

    def fields(self, dim: int) -> dict[str, tuple[int, torch.dtype | None]]:
        return {"codes": (dim, torch.uint8), "scale": (1, None)}

    def encode_fields(self, x: Tensor, *, meta_dtype: torch.dtype) -> dict[str, Tensor]:
        scale = div_exact(x.float().abs().amax(-1, keepdim=True), FP8_MAX).to(meta_dtype)  # (..., 1)
        return {"codes": fp8_encode(x, scale), "scale": scale}

    def decode_fields(self, parts: dict[str, Tensor], *, dtype: torch.dtype) -> Tensor:
        return fp8_decode(parts["codes"], parts["scale"], dtype=dtype)

    def kernel_layout(self, dim: int) -> dict:
        """What the fused kernels read (methods.kernels.quant_attention, family ``scalar``)."""
        return {"kernel": "scalar", "fmt": "fp8", "bits": 8, "group": dim}


# -- randomized Walsh-Hadamard rotation -----------------------------------------------------------
def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def hadamard_transform(x: Tensor) -> Tensor:
    """Orthonormal Walsh-Hadamard transform along the last axis (a power of two): H x / sqrt(D).
    H is symmetric, so the transform is its own inverse. (..., D) -> (..., D), log2(D) butterflies."""
    *lead, D = x.shape
    y, h = x, 1
    while h < D:
        y = y.reshape(*lead, D // (2 * h), 2, h)  # (..., D/2h, 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(*lead, D) * (1.0 / math.sqrt(D))


def random_signs(dim: int, *, seed: int, device=None) -> Tensor:
    """(D,) int8 of +-1 drawn from a generator seeded with ``seed`` (reproducible on any device)."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randint(0, 2, (dim,), generator=g, dtype=torch.int8) * 2 - 1).to(device)


def rotate(x: Tensor, signs: Tensor) -> Tensor:
    """Randomized Hadamard H diag(signs) x / sqrt(D), an orthogonal map. x (..., D) fp."""
    return hadamard_transform(x * signs.to(x.dtype))


def unrotate(y: Tensor, signs: Tensor) -> Tensor:
    """Inverse of :func:`rotate`: diag(signs) H y / sqrt(D)."""
    return hadamard_transform(y) * signs.to(y.dtype)


class RotatedQuantizer:
    """A codec applied to randomized-Hadamard-rotated vectors (QuaRot on K and V): encode
    ``inner`` (rotate(x)), decode ``unrotate(inner.decode(...))``. The sign vector (D int8) is
    held here, so a store that holds this codec counts it."""

    def __init__(self, inner, *, dim: int, seed: int, device=None):
        self.inner = inner
        self.signs = random_signs(dim, seed=seed, device=device)  # (D,) int8

    def fields(self, dim: int) -> dict[str, tuple[int, torch.dtype | None]]:
        return self.inner.fields(dim)

    def encode_fields(self, x: Tensor, *, meta_dtype: torch.dtype) -> dict[str, Tensor]:
        return self.inner.encode_fields(rotate(x.float(), self.signs), meta_dtype=meta_dtype)

    def decode_fields(self, parts: dict[str, Tensor], *, dtype: torch.dtype) -> Tensor:
        return unrotate(self.inner.decode_fields(parts, dtype=torch.float32), self.signs).to(dtype)

    def kernel_layout(self, dim: int) -> dict | None:
        """The inner codec's layout, read in the rotated space (the kernels rotate q and un-rotate the output)."""
        inner = getattr(self.inner, "kernel_layout", None)
        decl = inner(dim) if callable(inner) else None
        return None if decl is None else {**decl, "signs": self.signs}


# -- Lloyd-Max codebooks and TurboQuant-style quantizers ---------------------------------------------
CODEBOOK_FILE = Path(__file__).resolve().parent / "data" / "lloyd_max.json"
CODEBOOK_LAWS = ("gaussian", "beta")


@functools.cache
def _codebook_table() -> dict:
    return json.loads(CODEBOOK_FILE.read_text())


def codebook_reasons(law: str, dim: int, bits: int) -> list[str]:
    """Reasons no stored codebook fits ([] = ok)."""
    table = _codebook_table()
    key = "gaussian" if law == "gaussian" else f"beta_d{dim}"
    if law not in CODEBOOK_LAWS:
        return [f"unknown codebook law {law!r}; use one of {CODEBOOK_LAWS}"]
    if key not in table:
        have = sorted(k for k in table if k.startswith("beta_d"))
        return [f"no exact-Beta codebook for head_dim {dim} in {CODEBOOK_FILE.name} (have {have}); "
                "use codebook=gaussian or add the dimension to scripts/train/lloyd_max.py"]
    if str(bits) not in table[key]:
        return [f"no {bits}-bit codebook (stored: 1-8 bits)"]
    return []


def lloyd_max_codebook(law: str, dim: int, bits: int) -> tuple[list[float], list[float], float]:
    """(centroids, boundaries, distortion) of the stored ``bits``-bit Lloyd-Max quantizer of one
    coordinate of a uniformly random unit vector in R^dim, in units of the coordinate itself (the
    stored values are divided by sqrt(dim)); distortion is the expected squared error of a whole
    unit vector (dim coordinates)."""
    reasons = codebook_reasons(law, dim, bits)
    if reasons:
        raise ValueError("; ".join(reasons))
    key = "gaussian" if law == "gaussian" else f"beta_d{dim}"
    entry = _codebook_table()[key][str(bits)]
    s = 1.0 / math.sqrt(dim)
    return [c * s for c in entry["centroids"]], [b * s for b in entry["boundaries"]], float(entry["distortion"])


class TurboQuantizer:
    """TurboQuant-style vector quantizer of one head's K or V vectors (docs/PAPERS.md §1 and §6).

    x -> norm ||x|| (meta dtype) and u = x / ||x||; y = randomized Hadamard rotation of u (skipped
    when ``rotate=False``: the "scalar" baseline on raw coordinates); each coordinate of y is
    mapped to the nearest centroid of the ``mse_bits``-bit Lloyd-Max codebook for the coordinate
    law (``codebook``: "gaussian" N(0, 1/d), or "beta", the exact law for this d). With
    ``qjl_dim`` = m > 0, the residual r = y - y_mse is sketched: sign(S r) (m bits, S an m x d
    seeded standard Gaussian) and gamma = ||r|| (meta dtype) are stored, and decode adds
    sqrt(pi/2) / m * gamma * S^T sign(S r), whose inner product with any q is QJL's unbiased
    estimator of <q, r>. ``mse_bits`` may be 0 with QJL (then y_mse = 0).

    Constants (the sign vector, the codebook, S) are held by the quantizer in ``dtype`` (floats)
    or int8, so a store holding it counts them.
    """

    def __init__(self, *, dim: int, mse_bits: int, qjl_dim: int = 0, rotate: bool = True, codebook: str = "gaussian",
                 seed: int = 0, device=None, dtype: torch.dtype = torch.float32):
        if mse_bits < 0 or mse_bits > 8 or (mse_bits == 0 and qjl_dim == 0):
            raise ValueError(f"mse_bits must be in 0..8 (0 only with a QJL stage), got {mse_bits}")
        if qjl_dim % 8 or qjl_dim < 0:
            raise ValueError(f"qjl_dim must be a non-negative multiple of 8, got {qjl_dim}")
        if rotate and not is_power_of_two(dim):
            raise ValueError(f"the Walsh-Hadamard rotation needs a power-of-two head_dim, got {dim}")
        self.dim, self.mse_bits, self.qjl_dim, self.rotate = dim, mse_bits, qjl_dim, rotate
        self.signs = random_signs(dim, seed=seed, device=device) if rotate else None  # (D,) int8
        self.centroids = self.boundaries = None
        if mse_bits:
            c, b, _ = lloyd_max_codebook(codebook, dim, mse_bits)
            self.centroids = torch.tensor(c, dtype=dtype, device=device)  # (2^b,)
            self.boundaries = torch.tensor(b, dtype=dtype, device=device)  # (2^b - 1,)
        self.sketch = None
        if qjl_dim:
            g = torch.Generator().manual_seed(int(seed) + 7919)
            self.sketch = torch.randn(qjl_dim, dim, generator=g).to(device=device, dtype=dtype)  # (m, D)

    def fields(self, dim: int) -> dict[str, tuple[int, torch.dtype | None]]:
        out: dict[str, tuple[int, torch.dtype | None]] = {"norm": (1, None)}
        if self.mse_bits:
            out["codes"] = (dim * self.mse_bits // 8, torch.uint8)
        if self.qjl_dim:
            out["qjl"] = (self.qjl_dim // 8, torch.uint8)
            out["gamma"] = (1, None)
        return out

    def _mse(self, y: Tensor) -> tuple[Tensor | None, Tensor]:
        """y (..., D) fp32 -> (codes (..., D) uint8 or None, y_mse (..., D) fp32)."""
        if not self.mse_bits:
            return None, torch.zeros_like(y)
        idx = torch.bucketize(y, self.boundaries.float())  # (..., D) in [0, 2^b)
        return idx.to(torch.uint8), self.centroids.float()[idx]

    def encode_fields(self, x: Tensor, *, meta_dtype: torch.dtype) -> dict[str, Tensor]:
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True)  # (..., 1)
        u = x / norm.clamp_min(torch.finfo(torch.float32).tiny)
        y = rotate(u, self.signs) if self.rotate else u  # (..., D)
        idx, y_mse = self._mse(y)
        out = {"norm": norm.to(meta_dtype)}
        if idx is not None:
            out["codes"] = pack_codes(idx, self.mse_bits)
        if self.qjl_dim:
            r = y - y_mse  # (..., D)
            proj = r @ self.sketch.float().T  # (..., m)
            out["qjl"] = pack_codes((proj >= 0).to(torch.uint8), 1)  # (..., m/8)
            out["gamma"] = r.norm(dim=-1, keepdim=True).to(meta_dtype)
        return out

    def decode_fields(self, parts: dict[str, Tensor], *, dtype: torch.dtype) -> Tensor:
        norm = parts["norm"].float()  # (..., 1)
        if self.mse_bits:
            y = self.centroids.float()[unpack_codes(parts["codes"], self.mse_bits).long()]  # (..., D)
        else:
            y = torch.zeros(*norm.shape[:-1], self.dim, device=norm.device)
        if self.qjl_dim:
            sign = unpack_codes(parts["qjl"], 1).float() * 2 - 1  # (..., m)
            coef = math.sqrt(math.pi / 2) / self.qjl_dim * parts["gamma"].float()  # (..., 1)
            y = y + coef * (sign @ self.sketch.float())  # (..., D)
        x = unrotate(y, self.signs) if self.rotate else y
        return (x * norm).to(dtype)

    def kernel_layout(self, dim: int) -> dict:
        """What the fused kernels read (methods.kernels.turboquant_attention, family ``turboquant``): the codec
        itself (its bits, sketch size, rotation and constants)."""
        return {"kernel": "turboquant", "codec": self}
