"""``ratequant``: RateQuant (Zuo et al. 2026, "RateQuant: Optimal Mixed-Precision KV Cache
Quantization via Rate-Distortion Theory", arXiv:2605.06675; docs/PAPERS.md §2): per-unit bit widths by
reverse water-filling over a fitted distortion model D(b) = a * beta^-b, on top of a base quantizer.

Units are (layer, kv head, K or V). Calibration (``calibrate``, on held-out text, cached per model,
base and knobs under ``<artifacts_dir>/ratequant/``) runs the model once over the calibration
samples with the full cache, captures post-RoPE q, k, v, and for each unit and each width in
``widths`` quantizes only that unit's K (or V) with the base quantizer and measures the distortion.
It fits log D_u(b) = log a_u - b log beta by least squares (a_u per unit, beta per base quantizer)
and reports R^2; weighs units by an importance w_u; and allocates bits by reverse water-filling:
minimise sum_u w_u a_u beta^-b_u subject to mean_u b_u = B (B = 16 * (1 - ratio)) and
min(widths) <= b_u <= max(widths): b_u = clip(t + log_beta(w_u a_u)), the water level t found by
bisection (without clipping b_u = B + log_beta(w_u a_u) - mean_j log_beta(w_j a_j)). The real-valued
widths are rounded to supported widths keeping the budget exact: every unit starts at the widest
supported width <= b_u, then the leftover bits go one step at a time to the unit with the largest
gain per bit w_u a_u (beta^-b - beta^-b') / (b' - b). Each unit is stored by the base quantizer's
own store at its width, so memory is physical; the per-unit bit table (int8) is counted in ``bytes_stored``.

Decode (``fused``: auto = the base's fused kernels on CUDA, on, off): a layer's kv heads are grouped by
their (K width, V width) pair and each group is one store of the base over those heads, so a step launches
kernels per width pair, not per head, and every base decodes fused and CUDA-graph captured (where its
kernels serve the layer's shape):
- uniform_int, quarot (per-token CodecStores, ``base.codecs``): :class:`GroupedCodecStore`, each group's
  append and split kernels, one combine for the layer;
- kivi, turboquant_kqv (their own layouts): :class:`GroupedStore`, each group's store with the base's own
  fused decode (KIVI: attention, the step's writes, the combine), queries and outputs gathered and scattered
  by head index on the device (no host sync), the graph protocol delegated to the groups.
The reference path (``fused=off``, or CPU under auto) keeps one base store per kv head (the oracle the fused
path is tested against). The row's ``kernel`` is ``fused`` only when every group's store ran its kernels.

Choices the paper leaves open, and ours (knobs):
- ``base``: kivi | quarot | uniform_int | turboquant_kqv, with ``base_params`` for its knobs.
- Distortion: the attention-output MSE of the unit's head, ||o - o~||^2 averaged over the last
  ``calib_queries`` query positions of each of ``calib_samples`` samples of ``calib_length``
  tokens (causal, the query heads of the kv head's group), the other units exact. The base is
  measured without KIVI's full-precision window (the quantizer's own curve).
- ``importance``: "wo" (default): w_u = ||W_O[:, group of u]||_F^2 / (group * head_dim), the mean
  squared output-projection column of the unit's query heads, so w_u * D_u estimates the error
  the unit adds to the layer output under isotropic errors (docs/PAPERS.md §2, option (iii), without the
  Var(o) factor, which D_u already carries); "none": w_u = 1.
- ``allocation``: "calibrated" (the base's own fit), "uniform" (no calibration: floor(B) bits
  everywhere and, for a fractional B, one more bit to an evenly spread subset of units ordered K
  then V, by layer and head), "mismatched" (the fitted a_u and beta of ``mismatch_base``, default
  quarot for kivi and kivi otherwise: the paper's failure mode).
- ``widths``: supported widths (default 2..8); B must lie within them and B * units must be a
  whole number of bits, else the row is skipped with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from methods.api import CalibrationContext, KVStats, LayerSpec, MethodBase, ModelSpec
from methods.capture import Capture
from methods.quant_base import integer_bits, ratio_to_bits
from methods.stores import DenseStore, PartsGraphState

BASES = ("kivi", "quarot", "uniform_int", "turboquant_kqv")
ALLOCATIONS = ("calibrated", "uniform", "mismatched")
IMPORTANCE = ("wo", "none")


def make_base(name: str, params: dict | None = None) -> Any:
    from methods.kivi import Kivi
    from methods.quarot import QuaRot
    from methods.turboquant import TurboQuantKQV
    from methods.uniform_int import UniformInt

    classes = {"kivi": Kivi, "quarot": QuaRot, "uniform_int": UniformInt, "turboquant_kqv": TurboQuantKQV}
    if name not in classes:
        raise ValueError(f"unknown base quantizer {name!r}; use one of {BASES}")
    return classes[name](ratio=0.0, **dict(params or {}))


# -- calibration: capture (methods.capture.Capture), distortion, fit ---------------------------------


def causal_probs(q: Tensor, k: Tensor, *, scaling: float) -> Tensor:
    """Softmax attention of the last Nq positions' queries q (..., g, Nq, D) over keys k (..., 1, T, D),
    causal -> (..., g, Nq, T) fp32."""
    T, Nq = k.shape[-2], q.shape[-2]
    mask = torch.arange(T, device=q.device)[None, :] <= (T - Nq + torch.arange(Nq, device=q.device))[:, None]
    s = (q @ k.transpose(-1, -2)) * scaling  # (..., g, Nq, T)
    return s.masked_fill(~mask, -math.inf).softmax(-1)


def measure_distortion(base: Any, qkv: list[list[tuple[Tensor, Tensor, Tensor]]], widths: list[int], *,
                       n_queries: int, group_size: int = 1) -> Tensor:
    """D (L, H, 2, W): attention-output MSE (summed over head_dim, averaged over samples, query
    heads and the last ``n_queries`` positions) when only unit (layer, head, K|V) is quantized at
    each width. ``qkv``: per sample, per layer (q (1, H_q, T, D), k, v (1, H_kv, T, D)); samples
    are cut to a common length, a multiple of ``group_size``."""
    L = len(qkv[0])
    H = qkv[0][0][1].shape[1]
    T = min(s[0][1].shape[2] for s in qkv) // group_size * group_size
    out = torch.zeros(L, H, 2, len(widths), dtype=torch.float64)
    for layer in range(L):
        q, k, v = (torch.cat([s[layer][i][:, :, :T].float() for s in qkv]) for i in range(3))  # (S, H*, T, D)
        S, _, _, Dh = k.shape
        g = q.shape[1] // H
        scaling = q.shape[-1] ** -0.5
        kq = torch.stack([base.roundtrip(k, bits=b, kind="k", layer_idx=layer) for b in widths])  # (W, S, H, T, D)
        vq = torch.stack([base.roundtrip(v, bits=b, kind="v", layer_idx=layer) for b in widths])
        # every kv head at once (query heads h*g .. h*g+g-1 read kv head h): one batched op per step, not per head
        qh = q[:, :, -n_queries:].reshape(S, H, g, -1, Dh)  # (S, H, g, Nq, D)
        kh, vh = k[:, :, None], v[:, :, None]  # (S, H, 1, T, D)
        p = causal_probs(qh, kh, scaling=scaling)  # (S, H, g, Nq, T)
        ref = p @ vh  # (S, H, g, Nq, D)
        ok = causal_probs(qh[None], kq[:, :, :, None], scaling=scaling) @ vh  # (W, S, H, g, Nq, D)
        ov = p[None] @ vq[:, :, :, None]  # (W, S, H, g, Nq, D)
        out[layer, :, 0] = ((ok - ref) ** 2).sum(-1).mean((1, 3, 4)).t().double()  # (H, W)
        out[layer, :, 1] = ((ov - ref) ** 2).sum(-1).mean((1, 3, 4)).t().double()
    return out


def fit_distortion(D: Tensor, widths: list[int]) -> dict[str, Any]:
    """Least-squares fit of log D_u(b) = log a_u - b log beta with a_u per unit, beta shared.
    D (..., W) -> {"beta", "log_a" (...), "r2"}; R^2 of the pooled fit around the mean of log D."""
    y = D.clamp_min(1e-30).log().reshape(-1, len(widths))  # (U, W)
    b = torch.tensor(widths, dtype=torch.float64)
    bc = b - b.mean()
    yc = y - y.mean(-1, keepdim=True)
    slope = float((yc * bc).sum() / (bc * bc).sum() / y.shape[0])  # = -log beta
    log_a = (y - slope * b).mean(-1)  # (U,)
    pred = log_a[:, None] + slope * b
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"beta": math.exp(-slope), "log_a": log_a.reshape(D.shape[:-1]), "r2": 1 - ss_res / max(ss_tot, 1e-30)}


# -- allocation ---------------------------------------------------------------------------------------
def water_fill(log_c: Tensor, beta: float, mean_bits: float, lo: float, hi: float) -> Tensor:
    """Real-valued reverse water-filling: b_u = clip(t + log_beta(c_u), lo, hi) with mean b = mean_bits.
    log_c (U,) = log(w_u a_u)."""
    x = log_c.double() / math.log(beta)
    t_lo, t_hi = lo - float(x.max()) - 1, hi - float(x.min()) + 1
    for _ in range(200):
        t = (t_lo + t_hi) / 2
        if float((t + x).clamp(lo, hi).mean()) < mean_bits:
            t_lo = t
        else:
            t_hi = t
    return (t_lo / 2 + t_hi / 2 + x).clamp(lo, hi)


def round_to_widths(b: Tensor, log_c: Tensor, beta: float, total: int, widths: list[int]) -> Tensor:
    """Integer widths from ``widths`` summing to ``total``: start at the widest supported width <= b_u,
    then give the leftover bits step by step to the largest gain per bit w a (beta^-b - beta^-b')/(b' - b)."""
    ws = sorted(widths)
    cur = [max([w for w in ws if w <= float(x) + 1e-9] or [ws[0]]) for x in b.tolist()]
    left = total - sum(cur)
    if left < 0:
        raise ValueError(f"cannot meet {total} bits: the floors already take {sum(cur)}")
    c = log_c.double().exp().tolist()
    while left > 0:
        best, best_gain = None, -1.0
        for u, w in enumerate(cur):
            nxt = [x for x in ws if x > w and x - w <= left]
            if not nxt:
                continue
            w2 = nxt[0]
            gain = c[u] * (beta ** -w - beta ** -w2) / (w2 - w)
            if gain > best_gain:
                best, best_gain = (u, w2), gain
        if best is None:
            raise ValueError(f"cannot spend the last {left} bits on widths {ws}")
        left -= best[1] - cur[best[0]]
        cur[best[0]] = best[1]
    return torch.tensor(cur, dtype=torch.int64)


def uniform_widths(n_units_k: int, n_units: int, mean_bits: float) -> Tensor:
    """floor(B) everywhere, plus one bit to an evenly spread subset (units ordered K then V, by layer, head)."""
    base, frac = int(math.floor(mean_bits + 1e-9)), mean_bits - math.floor(mean_bits + 1e-9)
    extra = [int(math.floor((i + 1) * frac + 1e-9) - math.floor(i * frac + 1e-9)) for i in range(n_units)]
    return torch.tensor([base + e for e in extra], dtype=torch.int64)


# -- the method --------------------------------------------------------------------------------------
@dataclass
class RateQuant(MethodBase):
    """RateQuant: reverse water-filling of bits over (layer, kv head, K|V) by a fitted D(b) = a beta^-b,
    on top of a base quantizer (kivi, quarot, uniform_int, turboquant_kqv)."""

    ratio: float = 0.75
    base: str = "kivi"
    base_params: dict = field(default_factory=dict)
    allocation: str = "calibrated"
    mismatch_base: str = ""
    importance: str = "wo"
    widths: list = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8])
    calib_samples: int = 2
    calib_length: int = 512
    calib_queries: int = 128
    cache: bool = True
    seed: int = 0
    fused: str = "auto"

    family = "quantization"
    memory = "physical"
    kernel = "fused"  # every base has fused stores (grouped by width); rows record the path that ran
    name = "ratequant"

    def __post_init__(self) -> None:
        for knob, value, allowed in (("base", self.base, BASES), ("allocation", self.allocation, ALLOCATIONS),
                                     ("importance", self.importance, IMPORTANCE)):
            if value not in allowed:
                raise ValueError(f"{knob} must be one of {allowed}, got {value!r}")
        if self.mismatch_base and self.mismatch_base not in BASES:
            raise ValueError(f"mismatch_base must be one of {BASES}, got {self.mismatch_base!r}")
        self.widths = sorted(int(w) for w in self.widths)
        if not self.widths or self.widths[0] < 1 or self.widths[-1] > 8:
            raise ValueError(f"widths must be bit widths in 1..8, got {self.widths}")
        self.base_method = make_base(self.base, {"fused": self.fused, **dict(self.base_params)})
        self.bit_table: Tensor | None = None  # (L, H_kv, 2) int8 after calibrate()
        self.fit: dict[str, Any] = {}

    @property
    def mean_bits(self) -> float:
        return ratio_to_bits(self.ratio)

    @property
    def mismatched_with(self) -> str:
        return self.mismatch_base or ("quarot" if self.base == "kivi" else "kivi")

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)
        if self.ratio_reasons() or integer_bits(self.ratio) == 16:
            return reasons
        B, U = self.mean_bits, 2 * model.n_layers * model.n_kv_heads
        if not self.widths[0] <= B <= self.widths[-1]:
            reasons.append(f"ratequant cannot honour ratio {self.ratio}: {B:g} average bits lie outside widths "
                           f"{self.widths}")
        if abs(B * U - round(B * U)) > 1e-6:
            reasons.append(f"ratequant cannot honour ratio {self.ratio}: {B:g} bits x {U} units is not a whole "
                           "number of bits")
        for w in self.widths:
            reasons += self.base_method.extra_reasons(model, w, w)
        return list(dict.fromkeys(reasons))

    # -- calibration ------------------------------------------------------------------------------
    def _cache_path(self, ctx: CalibrationContext, base: str, fingerprint: str) -> Path:
        # a capture prefilled in chunks is another fit (an unchunked one keeps the key it always had)
        chunked = ctx.prefill_chunk is not None and ctx.prefill_chunk < self.calib_length
        key = json.dumps({"base": base, "params": self.base_params if base == self.base else {},
                          "widths": self.widths, "n": self.calib_samples, "len": self.calib_length,
                          "nq": self.calib_queries, "seed": [self.seed, ctx.seed], "importance": self.importance,
                          **({"chunk": ctx.prefill_chunk} if chunked else {})}, sort_keys=True)
        h = hashlib.sha1(key.encode()).hexdigest()[:12]
        model = "".join(c if c.isalnum() or c in "-_." else "_" for c in ctx.spec.name)[-60:]
        return Path(ctx.artifacts_dir) / "ratequant" / f"{model}-{fingerprint}" / f"{base}-{h}.json"

    def _importance(self, model: Any, spec: ModelSpec) -> Tensor:
        """(L, H_kv) importance weights."""
        L, H, D = spec.n_layers, spec.n_kv_heads, spec.head_dim
        g = spec.n_q_heads // H
        w = torch.ones(L, H, dtype=torch.float64)
        if self.importance == "none":
            return w
        mods = dict(model.named_modules())
        for layer in range(L):
            o = next((m for n, m in mods.items() if n.endswith(f"layers.{layer}.self_attn.o_proj")), None)
            if o is None:
                raise ValueError(f"importance='wo' found no layers.{layer}.self_attn.o_proj; use importance=none")
            W = o.weight.detach().double()  # (hidden, H_q * D)
            for h in range(H):
                w[layer, h] = (W[:, h * g * D:(h + 1) * g * D] ** 2).sum() / (g * D)
        return w

    def fit_base(self, ctx: CalibrationContext, base: str, qkv_fn) -> dict[str, Any]:
        """Fitted model of ``base`` (cached): D (L, H, 2, W), beta, log_a (L, H, 2), r2, importance (L, H)."""
        fingerprint = _fingerprint(ctx.model)
        path = self._cache_path(ctx, base, fingerprint)
        if self.cache and path.exists():
            data = json.loads(path.read_text())
            return {k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v for k, v in data.items()}
        bm = self.base_method if base == self.base else make_base(base)
        group = int(getattr(bm, "group_size", 1) or 1) if base == "kivi" else 1
        D = measure_distortion(bm, qkv_fn(), self.widths, n_queries=self.calib_queries, group_size=group)
        fit = fit_distortion(D, self.widths)
        fit.update(D=D, importance=self._importance(ctx.model, ctx.spec), base=base)
        if self.cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({k: v.tolist() if isinstance(v, Tensor) else v for k, v in fit.items()}))
        return fit

    def calibrate(self, ctx: CalibrationContext) -> None:
        spec = ctx.spec
        if integer_bits(self.ratio) == 16:
            return
        L, H = spec.n_layers, spec.n_kv_heads
        U = 2 * L * H
        total = int(round(self.mean_bits * U))
        if self.allocation == "uniform":
            self.set_bits(uniform_widths(L * H, U, self.mean_bits), L, H)
            self.fit = {"allocation": "uniform"}
            return
        captured: list = []
        timing: dict[str, float] = {}

        def clock() -> float:
            if torch.device(ctx.device).type == "cuda":
                torch.cuda.synchronize(ctx.device)
            return time.perf_counter()

        t0 = clock()

        def qkv():
            if not captured:
                t = clock()
                if ctx.run is None:
                    raise ValueError("ratequant needs CalibrationContext.run to capture q, k, v")
                samples = list(ctx.samples) or (ctx.make_samples(self.calib_samples, self.calib_length)
                                                 if ctx.make_samples else [])
                if not samples:
                    raise ValueError("ratequant needs calibration samples (CalibrationContext.samples or make_samples)")
                for s in samples[: self.calib_samples]:
                    cap = Capture()
                    ctx.run(cap, [s])
                    captured.append([(q.float(), k.float(), v.float()) for q, k, v in cap.captured])
                timing["capture_ms"] = 1000 * (clock() - t)
            return captured

        own = self.fit_base(ctx, self.base, qkv)
        src = own if self.allocation == "calibrated" else self.fit_base(ctx, self.mismatched_with, qkv)
        t1 = clock()
        # units ordered (kind, layer, head): K units first, as in uniform_widths
        log_c = (src["log_a"] + src["importance"].log()[:, :, None]).permute(2, 0, 1).reshape(-1)  # (U,)
        real = water_fill(log_c, src["beta"], self.mean_bits, self.widths[0], self.widths[-1])
        bits = round_to_widths(real, log_c, src["beta"], total, self.widths)
        self.set_bits(bits, L, H)
        t2 = clock()
        timing.update(fit_ms=1000 * (t1 - t0) - timing.get("capture_ms", 0.0), allocate_ms=1000 * (t2 - t1),
                      total_ms=1000 * (t2 - t0))
        self.fit = {"allocation": self.allocation, "beta": own["beta"], "r2": own["r2"], "source": src["base"],
                    "source_beta": src["beta"], "real_bits": real.reshape(2, L, H).permute(1, 2, 0),
                    "timing_ms": timing}

    def set_bits(self, bits: Tensor, L: int, H: int) -> None:
        """bits (U,) in (kind, layer, head) order -> bit_table (L, H, 2) int8."""
        self.bit_table = bits.reshape(2, L, H).permute(1, 2, 0).to(torch.int8).contiguous()

    # -- stores -----------------------------------------------------------------------------------
    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> Any:
        if integer_bits(self.ratio) == 16:
            return DenseStore(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        if self.bit_table is None:
            raise ValueError("ratequant has no bit allocation yet; call calibrate() first")
        bits = self.bit_table[layer.layer_idx].to(device)
        grouped = GroupedCodecStore.build(layer, self.base_method, bits, batch=batch, capacity=capacity, device=device,
                                          dtype=dtype)
        if grouped is not None:
            return grouped
        return GroupedStore.build(layer, self.base_method, bits, batch=batch, capacity=capacity, device=device,
                                  dtype=dtype)


    def head_store(self, layer: LayerSpec, head: int, *, batch: int, capacity: int, device: Any, dtype: Any) -> Any:
        """A store of kv head ``head`` of ``layer`` alone (its query group) at that head's widths, with its row of
        the bit table counted: for a selector whose heads keep different counts in front of RateQuant
        (methods/compose.py keeps one store per kv head then)."""
        sub = LayerSpec(layer_idx=layer.layer_idx, n_layers=layer.n_layers, n_q_heads=layer.n_groups, n_kv_heads=1,
                        head_dim=layer.head_dim, nominal_dtype=layer.nominal_dtype)
        if integer_bits(self.ratio) == 16:
            return DenseStore(sub, batch=batch, capacity=capacity, device=device, dtype=dtype)
        if self.bit_table is None:
            raise ValueError("ratequant has no bit allocation yet; call calibrate() first")
        bits = self.bit_table[layer.layer_idx, head : head + 1].to(device)  # (1, 2)
        return GroupedStore.build(sub, self.base_method, bits, batch=batch, capacity=capacity, device=device,
                                  dtype=dtype)


def _fingerprint(model: Any) -> str:
    """A short hash of the model's config and a few of its weights (the cache follows retraining)."""
    h = hashlib.sha1(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.parameters())
    for p in (params[0], params[len(params) // 2], params[-1]):
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:12]


class GroupedStore(PartsGraphState):
    """One layer as one base-quantizer store per (K width, V width) group of its kv heads, each built by the base's
    own ``store`` for a sub-layer of those heads (``n_kv_heads`` = the group's heads, ``n_q_heads`` = their query
    heads), so every base's layout, kernels and byte accounting serve RateQuant unchanged (KIVI's packed codes and
    rings, TurboQuant's codebooks and sketches; a layer whose heads all share one width is one store, as the base
    alone). ``bits`` (H_kv, 2) int8 is the layer's slice of the per-unit bit table (counted in bytes).

    ``extend`` gathers each group's query heads and kv heads (``index_select``), runs the group's store and
    scatters its output into the layer's (``index_copy_``): device ops only, no host sync. So the layer runs
    fused kernels (``kernel = "fused"``) when every group's store does, and its decode step is graph-safe when
    every group's is: the CUDA-graph protocol (``graph_snapshot`` / ``graph_restore`` / ``graph_advance``)
    delegates to each group. A decode step launches each group's kernels (KIVI: 3 per group), not 3 per head.

    Where a group's store takes the reference path (``fused=off``, CPU under ``auto``, a layout the kernels
    cannot serve), :meth:`build` keeps one store per head instead: the reference's numbers do not depend on
    which heads share a width (batching heads in one attention call moves fp32 sums by an ulp), and the
    per-store constants (QuaRot's sign vectors, TurboQuant's rotation and QJL projection) are counted per head
    as before. The fused path's bytes can be lower by those constants, held once per width pair.
    Bases whose stores are :class:`~methods.stores.CodecStore` s with fused kernels take
    :class:`GroupedCodecStore` instead (one combine per layer)."""

    @classmethod
    def build(cls, layer: LayerSpec, base: Any, bits: Tensor, *, batch: int, capacity: int, device: Any, dtype: Any
              ) -> GroupedStore:
        """Heads grouped by width pair where the base's stores run fused kernels; one group per head where they
        take the reference path (the oracle: its numbers and bytes do not depend on how heads share widths)."""
        rows = [(int(kb), int(vb)) for kb, vb in bits.tolist()]
        by_width = [[h for h, r in enumerate(rows) if r == pair] for pair in sorted(set(rows))]
        kw = dict(batch=batch, capacity=capacity, device=device, dtype=dtype)
        stores = []
        for heads in by_width:
            st = cls._store(layer, base, heads, rows[heads[0]], **kw)
            if getattr(st, "kernel", "reference") != "fused" and len(by_width) < len(rows):
                del st, stores
                return cls(layer, base, bits, [[h] for h in range(len(rows))], **kw)
            stores.append(st)
        return cls(layer, base, bits, by_width, stores=stores, **kw)

    @staticmethod
    def _store(layer: LayerSpec, base: Any, heads: list[int], pair: tuple[int, int], **kw: Any) -> Any:
        """The base's store for a sub-layer of ``heads`` (their query heads in order) at widths ``pair``."""
        sub = LayerSpec(layer_idx=layer.layer_idx, n_layers=layer.n_layers, n_q_heads=len(heads) * layer.n_groups,
                        n_kv_heads=len(heads), head_dim=layer.head_dim, nominal_dtype=layer.nominal_dtype)
        return base.store(sub, k_bits=pair[0], v_bits=pair[1], **kw)

    def __init__(self, layer: LayerSpec, base: Any, bits: Tensor, groups: list[list[int]], *, batch: int,
                 capacity: int, device: Any, dtype: Any, stores: list | None = None):
        """``groups``: the layer's kv heads partitioned into groups of one width pair each (``stores``: their
        stores, if already built)."""
        self.layer, self.bits = layer, bits  # bits (H_kv, 2) int8
        g = layer.n_groups
        rows = [(int(kb), int(vb)) for kb, vb in bits.tolist()]
        kw = dict(batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.groups = stores or [self._store(layer, base, heads, rows[heads[0]], **kw) for heads in groups]
        self.head_idx, self.qhead_idx = [], []
        for heads in groups:
            idx = torch.tensor(heads, dtype=torch.long, device=device)
            self.head_idx.append(idx)  # (n,) the layer's kv heads this group holds, in order
            self.qhead_idx.append((idx[:, None] * g + torch.arange(g, device=device)).reshape(-1))  # (n g,)
        self.whole = len(self.groups) == 1  # one group: the base's store as it is, no gather
        self.kernel = "fused" if all(getattr(st, "kernel", "reference") == "fused" for st in self.groups) else "reference"
        self.graph_safe = all(getattr(st, "graph_safe", False) for st in self.groups)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        if self.whole:
            return self.groups[0].extend(q, k, v, positions=positions, valid=valid, scaling=scaling)
        B, H_q, T, D = q.shape
        out = None
        for st, h, qh in zip(self.groups, self.head_idx, self.qhead_idx):
            o = st.extend(q.index_select(1, qh), k.index_select(1, h), v.index_select(1, h), positions=positions,
                          valid=valid, scaling=scaling)  # (B, T, n g, D)
            if out is None:
                out = o.new_empty(B, T, H_q, D)  # (B, T, H_q, D)
            out.index_copy_(2, qh, o)
        return out

    def ingest(self, k: Tensor, v: Tensor, *, valid: Tensor, seen: Tensor) -> None:
        """Load selected tokens (k, v (B, H_kv, T, D); :meth:`methods.stores.SlotStore.ingest`): each group's
        store takes its heads."""
        for st, h in zip(self.groups, self.head_idx):
            st.ingest(k.index_select(1, h), v.index_select(1, h), valid=valid, seen=seen)

    def end_of_context(self) -> None:
        for st in self.groups:
            st.end_of_context()

    def fork(self) -> GroupedStore:
        new = object.__new__(GroupedStore)
        new.__dict__.update(self.__dict__)
        new.bits = self.bits.clone()
        new.groups = [st.fork() for st in self.groups]
        return new

    def graph_parts(self) -> list:  # the CUDA-graph protocol (graph_safe: every group's store implements it)
        return self.groups

    def stats(self) -> KVStats:
        parts = [st.stats() for st in self.groups]
        kept = torch.zeros(parts[0].tokens_kept.shape[0], self.layer.n_kv_heads, dtype=torch.long)
        for p, h in zip(parts, self.head_idx):
            kept[:, h.cpu()] = p.tokens_kept
        return KVStats(
            tokens_kept=kept,  # (B, H_kv) in the layer's head order
            tokens_seen=parts[0].tokens_seen,
            bytes_stored=sum(p.bytes_stored for p in parts) + self.bits.numel(),
            bytes_allocated=sum(p.bytes_allocated for p in parts) + self.bits.numel(),
            bytes_read_per_step=sum(p.bytes_read_per_step for p in parts) + self.bits.numel(),
            bytes_full=sum(p.bytes_full for p in parts),
        )


class GroupedCodecStore:
    """A layer's kv heads grouped by (K width, V width), one fused :class:`~methods.stores.CodecStore` per group
    (holding those heads in order), for bases whose store is a CodecStore with a fused kernel
    (``base.codecs``) when the base's ``fused`` picks the kernels. A decode step runs each group's append and
    split kernels (the split partials of every group land in one buffer, indexed by the layer's query heads)
    and one combine for the layer: launches per layer = 2 x groups + 1, not 3 x heads. The groups share the
    layer's ``lengths`` / ``seen`` (advanced once, by the combine) and, for a rotated base (QuaRot: one sign
    vector per layer and K|V, whatever the width), the rotated q/k/v workspace. Prefill chunks of unpadded
    batches: each group quantizes its heads and dequantizes its past into one buffer, then one dense prefill
    kernel for the layer (methods.kernels.quant_attention.prefill_layer). Otherwise
    (padded chunks) every group takes the reference path of its CodecStore. Bytes: the groups' plus the bit
    table, as :class:`GroupedStore`."""

    kernel = "fused"
    graph_safe = True

    @classmethod
    def build(cls, layer: LayerSpec, base: Any, bits: Tensor, *, batch: int, capacity: int, device: Any, dtype: Any
              ) -> GroupedCodecStore | None:
        """The grouped store, or None where the base has no CodecStore codecs or its fused kernels are off or
        cannot serve (then :class:`GroupedStore`: the base's own stores, one per width pair, fused where the
        base's are)."""
        from methods.kernels import use_fused
        from methods.stores import CodecStore

        pairs = sorted({(int(kb), int(vb)) for kb, vb in bits.tolist()})
        codecs = {}
        for kb, vb in pairs:
            c = base.codecs(layer, k_bits=kb, v_bits=vb, device=device)
            if c is None or not use_fused(getattr(base, "fused", "off"), device, CodecStore.fused_reason(layer, *c)):
                return None
            codecs[(kb, vb)] = c
        return cls(layer, codecs, bits, batch=batch, capacity=capacity, device=device, dtype=dtype)

    def __init__(self, layer: LayerSpec, codecs: dict, bits: Tensor, *, batch: int, capacity: int, device: Any, dtype):
        from methods.kernels.quant_attention import codec_kernel, rotation_workspace
        from methods.stores import CodecStore

        self.layer, self.bits = layer, bits  # bits (H_kv, 2) int8
        g, D = layer.n_groups, layer.head_dim
        rows = [(int(kb), int(vb)) for kb, vb in bits.tolist()]
        workspace = rotation_workspace(batch, layer.n_q_heads, layer.n_kv_heads, D, device)
        self.groups, self.drivers, self.head_idx, self.qhead_idx = [], [], [], []
        for pair, (kc, vc) in codecs.items():
            heads = [h for h, r in enumerate(rows) if r == pair]
            sub = LayerSpec(layer_idx=layer.layer_idx, n_layers=layer.n_layers, n_q_heads=len(heads) * g,
                            n_kv_heads=len(heads), head_dim=D, nominal_dtype=layer.nominal_dtype)
            st = CodecStore(sub, kc, vc, batch=batch, capacity=capacity, device=device, dtype=dtype)
            idx = torch.tensor(heads, dtype=torch.long, device=device)
            drv = codec_kernel(layer, kc, vc, batch=batch, device=device, dtype=dtype, heads=idx,
                               workspace=workspace)
            self.groups.append(st)
            self.drivers.append(drv)
            self.head_idx.append(idx)  # (n,) the layer's kv heads this group holds
            self.qhead_idx.append((idx[:, None] * g + torch.arange(g, device=device)).reshape(-1))  # (n g,)
        for st in self.groups[1:]:
            self._share(st)
        self.uniform = True

    def _share(self, st: Any) -> None:
        st.lengths, st.seen = self.groups[0].lengths, self.groups[0].seen

    @property
    def lengths(self) -> Tensor:
        return self.groups[0].lengths

    @property
    def hi(self) -> int:
        return self.groups[0].hi

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        B, H_q, T, D = q.shape
        g0 = self.groups[0]
        g0._check_capacity(T)
        if T == 1:
            qq, kk, vv = q[:, :, 0], k[:, :, 0], v[:, :, 0]
            rq = rk = rv = None
            for st, drv in zip(self.groups, self.drivers):
                rq, rk, rv = drv.append_decode(st, qq, kk, vv)  # the workspace is shared: the last call returns it
            ns = self.drivers[0].n_splits(B, max(1, self.layer.n_kv_heads // len(self.groups)), g0.capacity, q.device)
            mid_o = torch.empty(B, H_q, ns, D, dtype=torch.float32, device=q.device)
            mid_l = torch.empty(B, H_q, ns, dtype=torch.float32, device=q.device)
            for st, drv in zip(self.groups, self.drivers):
                drv.split(st, rq, mid_o, mid_l, scaling=scaling)
            from methods.kernels.quant_attention import combine_new

            out = torch.empty(B, H_q, D, dtype=q.dtype, device=q.device)
            combine_new(mid_o, mid_l, rq, rk, rv, out, scaling=scaling, rot_v_t=self.drivers[0].rot_v_t,
                        advance=(g0.lengths, g0.seen, valid[:, 0]))
            self.uniform = False
            for st in self.groups:
                st.hi += 1
            return out[:, None]
        if self.uniform and bool(valid.all()):
            from methods.kernels.quant_attention import prefill_layer

            out = prefill_layer(list(zip(self.groups, self.drivers)), q, k, v, start=g0.hi, scaling=scaling)
            g0.lengths.add_(T)
            g0.seen.add_(T)
            for st in self.groups:
                st.hi += T
            return out
        self.uniform = False
        out = torch.empty(B, T, H_q, D, dtype=q.dtype, device=q.device)
        lengths, seen = g0.lengths, g0.seen  # the reference path rebinds them: every group starts from these
        for st, h, qh in zip(self.groups, self.head_idx, self.qhead_idx):
            st.lengths, st.seen = lengths, seen
            o = st.extend(q.index_select(1, qh), k.index_select(1, h), v.index_select(1, h), positions=positions,
                          valid=valid, scaling=scaling)  # (B, T, n g, D)
            out.index_copy_(2, qh, o)
        for st in self.groups[1:]:
            self._share(st)
        return out

    def ingest(self, k: Tensor, v: Tensor, *, valid: Tensor, seen: Tensor) -> None:
        """Load selected tokens (k, v (B, H_kv, T, D); :meth:`methods.stores.SlotStore.ingest`): each group
        encodes its heads; the groups share the first group's ``lengths`` / ``seen`` again afterwards."""
        for st, h in zip(self.groups, self.head_idx):
            st.ingest(k.index_select(1, h), v.index_select(1, h), valid=valid, seen=seen)
        for st in self.groups[1:]:
            self._share(st)
        self.uniform = bool(valid.all())

    def end_of_context(self) -> None:
        for st in self.groups:
            st.end_of_context()

    def fork(self) -> GroupedCodecStore:
        new = object.__new__(GroupedCodecStore)
        new.__dict__.update(self.__dict__)
        new.groups = [st.fork() for st in self.groups]
        for st in new.groups[1:]:
            st.lengths, st.seen = new.groups[0].lengths, new.groups[0].seen
        return new

    # -- CUDA-graph protocol -----------------------------------------------------------------------
    def graph_snapshot(self) -> tuple:
        return self.groups[0].graph_snapshot(), [st.hi for st in self.groups], self.uniform

    def graph_restore(self, snap: tuple) -> None:
        first, his, self.uniform = snap
        self.groups[0].graph_restore(first)
        for st, hi in zip(self.groups, his):
            st.hi = hi

    def graph_advance(self, steps: int) -> None:
        for st in self.groups:
            st.graph_advance(steps)
        self.uniform = False

    def stats(self) -> KVStats:
        parts = [st.stats() for st in self.groups]
        kept = torch.zeros(parts[0].tokens_kept.shape[0], self.layer.n_kv_heads, dtype=torch.long)
        for p, h in zip(parts, self.head_idx):
            kept[:, h.cpu()] = p.tokens_kept
        seen = self.groups[0].seen.detach().to("cpu", torch.long)
        return KVStats(
            tokens_kept=kept,  # (B, H_kv)
            tokens_seen=seen,
            bytes_stored=sum(p.bytes_stored for p in parts) + self.bits.numel(),
            bytes_allocated=sum(p.bytes_allocated for p in parts) + self.bits.numel(),
            bytes_read_per_step=sum(p.bytes_read_per_step for p in parts) + self.bits.numel(),
            bytes_full=sum(p.bytes_full for p in parts),
        )


__all__ = ["RateQuant", "Capture", "GroupedStore", "GroupedCodecStore", "water_fill", "round_to_widths", "fit_distortion", "measure_distortion",
           "uniform_widths", "make_base"]
