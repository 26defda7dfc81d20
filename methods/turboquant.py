"""``turboquant_kv`` / ``turboquant_kqv`` / ``turboquant_qkqv``: the three TurboQuant-style schemes of
paper 1 (D'Alberto 2026, "Statistical Inference and Quality Measures of KV Cache Quantisations
Inspired by TurboQuant", arXiv:2605.08114), at a fair budget of n bits per coordinate.

Every vector x (one token's K or V of one kv head) is stored as its norm ||x|| (model dtype) and
codes of u = x / ||x|| after a randomized Walsh-Hadamard rotation H diag(s) / sqrt(D): each rotated
coordinate is mapped to a Lloyd-Max codebook for the coordinate law of a random unit vector
(``methods/data/lloyd_max.json``, written by ``scripts/train/lloyd_max.py``; TurboQuant-MSE, Zandieh et
al. 2025). A QJL stage (Zandieh, Daliri, Han 2024) may follow on the residual r = y - y_mse:
sign(S r) with S an m x D seeded standard Gaussian, plus gamma = ||r|| (model dtype).

- ``turboquant_kv``: K and V each n-bit MSE (the paper's "scalar MSE baseline").
- ``turboquant_kqv``: K n-bit MSE; V (n - m/D)-bit MSE + m-bit QJL.
- ``turboquant_qkqv``: K and V both (n - m/D)-bit MSE + m-bit QJL.

Keys with a QJL stage are scored with QJL's unbiased estimator
<q, k_mse> + sqrt(pi/2)/m * gamma * <S q, sign(S r)> (times ||k||); the store decodes
k_mse + sqrt(pi/2)/m * gamma * S^T sign(S r), whose inner product with q is that estimator exactly
(it is linear in q), then attends as usual.

Choices the paper leaves open, and ours (each a knob):
- ``qjl_dim`` m (0 = head_dim D, one bit per coordinate): the QJL stage costs m/D bits per
  coordinate of the budget, the MSE stage gets n - m/D (TurboQuant-prod's (n-1) + 1 split at m = D).
  n - m/D must be a whole number in 0..8; 0 means QJL alone.
- ``rotate`` (default true): whether the scheme rotates before the scalar codebook. False is the
  plain per-coordinate Lloyd-Max on raw coordinates of u (docs/PAPERS.md §1 (d) 2).
- ``codebook``: "gaussian" (the N(0, 1/D) limit, recommended for D >= 64) or "beta" (the exact
  coordinate law for this D; stored for D in 32, 64, 128, 256).
- ``seed``: rotation signs and S per (layer, K|V), shared by the kv heads of a layer; the signs
  (D int8), codebook (2^b centroids, 2^b - 1 boundaries) and S (m x D) are held by the store and
  counted in ``bytes_stored``, as are the norms and gamma (16 bits each per vector).
- Ratio: n = 16 * (1 - ratio) must be a whole number of bits in 1..8 (16 = unquantized);
  2.5 bits is skipped (TurboQuant's outlier-channel split for fractional rates is not implemented).

Kernels (``fused``: auto = on CUDA, on, off; :mod:`methods.kernels.turboquant_attention`): a decode step encodes
the new token on the device and attends from the stored codes (q rotated once per step; the codebook looked up
per element; a QJL key side scored by the estimator above as a sign dot product with S q_r, never a decoded key;
values accumulated in the rotated and sketch spaces, projected by S^T and un-rotated once), graph-safe, in three
launches. Prefill chunks are encoded by a kernel and attend to the past decoded by a kernel. Codes equal the
reference store's except where a rotated coordinate sits within float rounding of a codebook boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from methods.api import LayerSpec, ModelSpec
from methods.quant_base import QuantMethod, codec_roundtrip, unit_seed
from methods.quantizers import CODEBOOK_LAWS, TurboQuantizer, codebook_reasons, is_power_of_two
from methods.stores import CodecStore


@dataclass
class _TurboQuant(QuantMethod):
    """Shared body of the three schemes; ``qjl_on`` names the tensors that get a QJL stage."""

    ratio: float = 0.75
    qjl_dim: int = 0
    rotate: bool = True
    codebook: str = "gaussian"
    seed: int = 0

    qjl_on: ClassVar[tuple[str, ...]] = ()
    kernel = "fused"  # fused decode kernels (fused=auto: on CUDA); rows record the path that ran

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.qjl_dim) < 0 or int(self.qjl_dim) % 8:
            raise ValueError(f"qjl_dim must be 0 (= head_dim) or a positive multiple of 8, got {self.qjl_dim}")
        if self.codebook not in CODEBOOK_LAWS:
            raise ValueError(f"codebook must be one of {CODEBOOK_LAWS}, got {self.codebook!r}")

    def split(self, dim: int, bits: int, kind: str) -> tuple[int | None, int]:
        """(MSE bits or None when not whole, QJL sketch size m) of one vector at ``bits`` per coordinate."""
        if kind not in self.qjl_on:
            return bits, 0
        m = int(self.qjl_dim) or dim
        if m % dim:
            return None, m
        return bits - m // dim, m

    def extra_reasons(self, model: ModelSpec, k_bits: int, v_bits: int) -> list[str]:
        D = model.head_dim
        reasons = []
        if self.rotate and not is_power_of_two(D):
            reasons.append(f"{self.name}'s Walsh-Hadamard rotation needs a power-of-two head_dim, got {D}")
        for kind, bits in (("k", k_bits), ("v", v_bits)):
            mse, m = self.split(D, bits, kind)
            if mse is None:
                reasons.append(f"qjl_dim {m} is not a multiple of head_dim {D}: the QJL stage must cost whole bits")
            elif mse < 0 or mse > 8 or (mse == 0 and not m):
                reasons.append(f"{self.name} at {bits} bits leaves {mse} MSE bits for {kind.upper()} (needs 0..8)")
            elif mse:
                reasons += codebook_reasons(self.codebook, D, mse)
        return list(dict.fromkeys(reasons))

    def codec(self, dim: int, bits: int, *, layer_idx: int, kind: str, device: Any = None, dtype: Any = None):
        mse, m = self.split(dim, bits, kind)
        assert mse is not None, "call validate() first"
        kw = {"dtype": dtype} if dtype is not None else {}
        return TurboQuantizer(dim=dim, mse_bits=mse, qjl_dim=m, rotate=bool(self.rotate), codebook=self.codebook,
                              seed=unit_seed(self.seed, layer_idx, kind), device=device, **kw)

    def store(self, layer: LayerSpec, *, k_bits: int, v_bits: int, batch: int, capacity: int, device: Any,
              dtype: Any) -> CodecStore:
        D = layer.head_dim
        kc = self.codec(D, k_bits, layer_idx=layer.layer_idx, kind="k", device=device, dtype=dtype)
        vc = self.codec(D, v_bits, layer_idx=layer.layer_idx, kind="v", device=device, dtype=dtype)
        return CodecStore(layer, kc, vc, batch=batch, capacity=capacity, device=device, dtype=dtype,
                          fused=self.use_fused(layer, kc, vc, device))

    def roundtrip(self, x: Tensor, *, bits: int, kind: str, layer_idx: int) -> Tensor:
        codec = self.codec(x.shape[-1], bits, layer_idx=layer_idx, kind=kind, device=x.device, dtype=x.dtype)
        return codec_roundtrip(codec, x)


@dataclass
class TurboQuantKV(_TurboQuant):
    """Paper 1's KV scheme (TurboQuant-style, arXiv:2605.08114): randomized Hadamard + n-bit Lloyd-Max codes
    and a norm per vector, on both K and V (no QJL stage)."""

    name = "turboquant_kv"
    qjl_on = ()


@dataclass
class TurboQuantKQV(_TurboQuant):
    """Paper 1's KQV scheme (TurboQuant-style, arXiv:2605.08114): n-bit rotated Lloyd-Max codes on K;
    (n - 1)-bit codes + a 1-bit QJL residual sketch on V (the paper's winner at n = 4)."""

    name = "turboquant_kqv"
    qjl_on = ("v",)


@dataclass
class TurboQuantQKQV(_TurboQuant):
    """Paper 1's QKQV scheme (TurboQuant-style, arXiv:2605.08114): (n - 1)-bit rotated Lloyd-Max codes +
    a 1-bit QJL residual sketch on both K and V (TurboQuant-prod on keys, unbiased scores)."""

    name = "turboquant_qkqv"
    qjl_on = ("k", "v")
