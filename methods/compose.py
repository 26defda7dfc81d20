"""``compose``: an eviction selector in front of a quantizer (issue 23 item 5; docs/ARCHITECTURE.md §4-§5):
the selector decides which context tokens each (row, kv head) keeps, the quantizer stores the kept ones in
its own layout (physical bytes: codes, scales, windows), e.g. SnapKV + KIVI, LKV + RateQuant, prefill-only H2O + INT4.

What composition means here, and every choice made:

- Selection first, quantization after, so nothing evicted is ever quantized. The context is prefilled in the
  selector's own store (:class:`methods.ragged.EvictionStore`, or its fused twin on CUDA): full precision, every
  chunk attends to every earlier context token, the store observes what the selector scores from (the
  observation window's queries, the attention mass), exactly as the eviction method alone. At
  ``end_of_context`` the selector's own ``plan`` (the eviction method's policy, budgets and scores, called
  unchanged) picks the kept tokens; they are gathered in position order and loaded into a fresh store of the
  quantizer (``quantizer.new_layer``) through the stores' explicit ``ingest`` entry point
  (:meth:`methods.stores.SlotStore.ingest`: the quantizer's own write path, no attention call); the
  full-precision prefill buffer is then dropped. Question and decode tokens go through the quantizer's store
  (quantized on append as the quantizer alone does; its fused decode kernel and CUDA graph where it has them).
- Bytes: the quantizer's store measures them (``stats``) over the tensors it holds; ``bytes_full`` counts every
  context token seen (``ingest`` carries the row's ``seen``), so ``ratio_achieved`` is the product of both
  savings with every overhead counted (scales, zero points, KIVI's full-precision window of the kept tokens,
  rotation constants). The selector's per-token scores and positions are not stored: nothing uses them after
  the selection (selectors that would are refused, below). Positions are not needed either: keys are stored
  after RoPE and stay at their absolute positions.
- Ratio: ``ratio`` is the overall target fraction of bytes removed. The quantizer runs at ``quantizer_ratio``
  (its own mapping: 16 x (1 - quantizer_ratio) code bits, e.g. 0.75 = 4 bits) and the selector keeps
  ``1 - selector_ratio`` of the context, with 1 - ratio = (1 - selector_ratio) x (1 - quantizer_ratio): set one
  of the two knobs and ``ratio`` derives the other (both set: ``ratio`` must equal their product, else a
  skipped row). Like every quantizer the split uses nominal code bits: overheads are outside it and
  ``ratio_achieved`` reports them. A ratio the pair cannot honour is a skipped row with the reason: below
  ``quantizer_ratio`` (the selector would keep more than every token), or a derived part ratio the part
  refuses (a bit width the quantizer does not store, LKV without weights for the selector's ratio).
- Per-head budgets (AdaKV, LKV): when every kv head of each row keeps as many tokens (SnapKV, PyramidKV's
  per-layer budgets, ...) the layer is one store of the quantizer; when heads keep different counts the layer is
  one store per kv head (each with its query group), since the quantizers' slot stores hold one length per
  row. Per-head constants (QuaRot's signs, TurboQuant's rotation) are then held and counted per head, and a
  decode step launches each head's kernels. RateQuant gives each head its own widths (``head_store``).
- Refused with a reason (a skipped row), never approximated: selectors whose work continues after
  ``end_of_context`` (H2O with ``evict_in_decode=true`` or LKV's, ``value_aware`` with decode-query support,
  anything that re-selects after compaction), since a quantized store cannot free or re-select slots on
  the device; selectors without a prefill-time plan (``streaming_llm``: its store is a ring that evicts the
  oldest window token at every decode step; ``selector=random`` with ``selector_params={n_sink: 4, window:
  1000000000}`` makes the same prefill selection, sinks then the most recent tokens); sparse-read selectors
  (``quest``, ``louver``): a sparse read keeps every token and reads a subset per step, so "in front of a
  quantizer" would mean its index over the quantized pages, which is not implemented; and a "quantizer"
  that is not of the quantization family. H2O with ``evict_in_decode=false`` (prefill-only) is supported: its
  accumulated mass decides the selection at ``end_of_context`` and nothing after.
- Chunking and scales: the kept tokens enter the quantizer's store in one ingest (KIVI's result does not
  depend on the chunking; FP8 ``scale=head`` takes its scale from the kept tokens, the first tokens written).
- Kernel: ``fused`` only when the selector's prefill store and the quantizer's store both run their kernels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from methods.api import CalibrationContext, KVStats, LayerSpec, MethodBase, ModelSpec
from methods.stores import PartsGraphState

__all__ = ["Compose", "ComposedStore", "HeadStores"]


def _fraction(x: float) -> Fraction:
    return Fraction(repr(float(x)))


@dataclass
class Compose(MethodBase):
    """An eviction selector (``selector``, a catalogue name, with ``selector_params``) in front of a quantizer
    (``quantizer``, with ``quantizer_params``); ``quantizer_ratio`` or ``selector_ratio`` splits ``ratio``."""

    ratio: float = 0.875
    selector: str = "snapkv"
    quantizer: str = "kivi"
    selector_params: dict = field(default_factory=dict)
    quantizer_params: dict = field(default_factory=dict)
    quantizer_ratio: float | None = 0.75
    selector_ratio: float | None = None

    family = "composed"
    memory = "physical"
    kernel = "fused"  # both parts have fused paths; rows record the path that actually ran
    name = "compose"

    def __post_init__(self) -> None:
        from methods import catalog

        for knob in ("selector", "quantizer"):
            value = getattr(self, knob)
            if value == self.name:
                raise ValueError(f"compose's {knob} cannot be compose itself; name an eviction method (selector) and a "
                                 "quantizer of the catalogue")
            catalog.get(str(value))  # an unknown name says what is close and what exists
        for knob in ("quantizer_ratio", "selector_ratio"):
            r = getattr(self, knob)
            if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r)
                                  or not 0.0 <= float(r) < 1.0):
                raise ValueError(f"{knob} must be null or a fraction of bytes removed in [0, 1), got {r!r}")
        if self.quantizer_ratio is None and self.selector_ratio is None:
            raise ValueError("set quantizer_ratio (the quantizer's ratio; ratio derives the selector's) or "
                             "selector_ratio (the selector's; ratio derives the quantizer's)")
        s, q = self.split()
        self.selector_method = catalog.build(self.selector, ratio=s, **dict(self.selector_params))
        self.quantizer_method = catalog.build(self.quantizer, ratio=q, **dict(self.quantizer_params))

    # -- the ratio split ----------------------------------------------------------------------------
    def split(self) -> tuple[float, float]:
        """(selector ratio, quantizer ratio) with 1 - ratio = (1 - selector) (1 - quantizer), exact in fractions
        of the decimal forms (0.875 at quantizer 0.75 -> selector 0.5); out of [0, 1) when ``ratio`` cannot be
        honoured (:meth:`ratio_reasons` says so)."""
        r = _fraction(self.ratio) if isinstance(self.ratio, (int, float)) and math.isfinite(self.ratio) else Fraction(0)
        if self.selector_ratio is not None and self.quantizer_ratio is not None:
            return float(self.selector_ratio), float(self.quantizer_ratio)
        if self.quantizer_ratio is not None:
            q = _fraction(self.quantizer_ratio)
            return float(1 - (1 - r) / (1 - q)), float(q)
        s = _fraction(self.selector_ratio)
        return float(s), float(1 - (1 - r) / (1 - s))

    def ratio_reasons(self) -> list[str]:
        reasons = super().ratio_reasons()
        if reasons:
            return reasons
        s, q = self.split()
        r = float(self.ratio)
        if self.selector_ratio is not None and self.quantizer_ratio is not None:
            want = 1 - (1 - _fraction(s)) * (1 - _fraction(q))
            if want != _fraction(r):
                return [f"compose cannot honour ratio {r}: selector_ratio {s} and quantizer_ratio {q} remove "
                        f"1 - (1 - {s}) (1 - {q}) = {float(want):g} of the bytes; set one of them (null) and ratio "
                        "derives it"]
        elif self.quantizer_ratio is not None and s < 0:
            return [f"compose cannot honour ratio {r}: {self.quantizer} at quantizer_ratio {q} already removes {q:g} of "
                    f"the bytes and the selector cannot keep more than every token; use ratio >= {q:g} or a lower "
                    "quantizer_ratio"]
        elif self.selector_ratio is not None and q < 0:
            return [f"compose cannot honour ratio {r}: {self.selector} at selector_ratio {s} already removes {s:g} of "
                    f"the tokens; use ratio >= {s:g} or a lower selector_ratio"]
        reasons += [f"compose (selector at ratio {s:g}): {x}" for x in self.selector_method.ratio_reasons()]
        reasons += [f"compose (quantizer at ratio {q:g}): {x}" for x in self.quantizer_method.ratio_reasons()]
        return reasons

    # -- what the pair can do -----------------------------------------------------------------------
    def pair_reasons(self, model: ModelSpec) -> list[str]:
        """Why this selector cannot stand in front of this quantizer ([] = it can); see the module docstring."""
        sel, quant = self.selector_method, self.quantizer_method
        reasons = []
        if sel.family == "sparse":
            reasons.append(f"compose: {self.selector} is a sparse read (it keeps every token and reads a subset per "
                           "decode step); a sparse selector in front of a quantizer would be its index over the "
                           "quantized pages, which is not implemented: choose an eviction selector")
        elif sel.family != "eviction":
            reasons.append(f"compose: the selector must be an eviction method, {self.selector} is of family "
                           f"{sel.family!r}")
        elif not (hasattr(sel, "policy") and hasattr(sel, "plan")):
            reasons.append(f"compose: {self.selector} has no prefill-time plan (methods.ragged's policy / plan): its "
                           "store evicts as decode runs (streaming_llm: a ring that drops the oldest window token each "
                           "step), which a quantized store cannot do. The same prefill selection (sinks, then the most "
                           "recent tokens) is selector=random with selector_params={n_sink: 4, window: 1000000000}")
        elif not self.ratio_reasons():
            P = sel.policy(model.layer(0))
            if P.evicts_in_decode:
                reasons.append(f"compose: {self.selector} evicts during decode (a head over its budget frees its "
                               "lowest-score token every step), which a quantized store cannot do on the device; "
                               f"use method.selector_params.evict_in_decode=false (selection at end_of_context only)")
            elif P.evicts_after_compaction or P.rescore_every:
                reasons.append(f"compose: {self.selector} re-selects its kept tokens after end_of_context (after "
                               "question chunks or every few decode steps), which a quantized store cannot do; "
                               "choose a selector that decides at end_of_context (value_aware: "
                               "support=prefill_window)")
        if quant.family != "quantization":
            reasons.append(f"compose: the quantizer must be of the quantization family, {self.quantizer} is of "
                           f"family {quant.family!r}")
        return reasons

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)  # engine reasons + ratio_reasons
        reasons += self.pair_reasons(model)
        if not reasons:
            reasons += list(self.selector_method.validate(model)) + list(self.quantizer_method.validate(model))
        return list(dict.fromkeys(reasons))

    def calibrate(self, ctx: CalibrationContext) -> None:
        """Both parts' own calibration (LKV loads its weights, RateQuant fits its widths on the full cache)."""
        self.selector_method.calibrate(ctx)
        self.quantizer_method.calibrate(ctx)

    @property
    def needs_weights(self) -> bool:
        """Whether a part reads trained weights (LKV): a missing file is then a skip that training lifts."""
        return any(getattr(m, "needs_weights", False) for m in (self.selector_method, self.quantizer_method))

    def cache_identity(self, model_name: str) -> str | None:
        """The trained weights a part reads (LKV), for caches keyed by them (harness.evaluate)."""
        ids = [f"{part}={ident}" for part, m in (("selector", self.selector_method), ("quantizer", self.quantizer_method))
               if hasattr(m, "cache_identity") and (ident := m.cache_identity(model_name)) is not None]
        return ";".join(ids) or None

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> ComposedStore:
        return ComposedStore(layer, self.selector_method, self.quantizer_method, batch=batch, capacity=capacity,
                             device=device, dtype=dtype)


class ComposedStore:
    """The selector's prefill store until ``end_of_context``, the quantizer's store of the kept tokens after it
    (the module docstring says how). Before: ``prefill`` (an :class:`~methods.ragged.EvictionStore`); after:
    ``store`` (the quantizer's, or :class:`HeadStores` when heads keep different counts)."""

    def __init__(self, layer: LayerSpec, selector: Any, quantizer: Any, *, batch: int, capacity: int, device: Any,
                 dtype: Any):
        self.layer, self.batch, self.capacity, self.device, self.dtype = layer, batch, int(capacity), device, dtype
        self.selector, self.quantizer = selector, quantizer
        self.prefill = selector.new_layer(layer, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.store: Any = None
        # the path each part takes: the selector's prefill store, and the quantizer's store for this layer (a probe
        # of one slot, dropped; the store built at end_of_context replaces it)
        probe = quantizer.new_layer(layer, batch=batch, capacity=1, device=device, dtype=dtype)
        self.prefill_kernel = getattr(self.prefill, "kernel", "reference")
        self.probe_kernel = getattr(probe, "kernel", "reference")
        del probe

    @property
    def kernel(self) -> str:
        """``fused`` when the selector's prefill store and the quantizer's store both run their kernels."""
        quant = self.probe_kernel if self.store is None else getattr(self.store, "kernel", "reference")
        return "fused" if self.prefill_kernel == "fused" and quant == "fused" else "reference"

    @property
    def graph_safe(self) -> bool:
        return self.store is not None and bool(getattr(self.store, "graph_safe", False))

    # -- LayerKV ------------------------------------------------------------------------------------
    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        st = self.prefill if self.store is None else self.store
        return st.extend(q, k, v, positions=positions, valid=valid, scaling=scaling)

    def end_of_context(self) -> None:
        """Select with the selector's plan over the full-precision prefill buffer, ingest the kept tokens into the
        quantizer's store, drop the buffer."""
        if self.store is not None:
            return
        pre = self.prefill
        inp = pre.score_input()
        keep = self.selector.plan(inp).keep  # (B, H_kv, S) bool
        B, H, S, D = inp.keys.shape
        counts = keep.sum(-1)  # (B, H_kv) tokens each head keeps
        K = max(1, int(counts.max()))  # host sync: once per sample
        # kept slots first, in slot (= position) order; what follows a head's kept tokens is zeroed below
        order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[..., :K]  # (B, H_kv, K)
        present = torch.arange(K, device=keep.device) < counts[..., None]  # (B, H_kv, K)
        idx = order[..., None].expand(B, H, K, D)  # (B, H_kv, K, D)
        k = inp.keys.gather(2, idx).masked_fill(~present[..., None], 0)  # (B, H_kv, K, D): no evicted token
        v = inp.values.gather(2, idx).masked_fill(~present[..., None], 0)
        seen = pre.seen.clone()  # (B,) context tokens each row has seen
        capacity = K + (self.capacity - pre.hi)  # kept tokens + the question and decode reserve
        del inp, keep, order, idx
        self.prefill = None  # the full-precision prefill buffer is freed
        kw = dict(batch=self.batch, capacity=capacity, device=self.device, dtype=self.dtype)
        if bool((counts == counts[:, :1]).all()):  # every kv head of a row keeps as many tokens: one store
            store = self.quantizer.new_layer(self.layer, **kw)
            store.ingest(k, v, valid=present[:, 0], seen=seen)
        else:  # heads keep different counts: one store per kv head (slot stores hold one length per row)
            stores = []
            for h in range(H):
                st = self._head_store(h, **kw)
                st.ingest(k[:, h : h + 1], v[:, h : h + 1], valid=present[:, h], seen=seen)
                stores.append(st)
            store = HeadStores(self.layer, stores)
        self.store = store

    def _head_store(self, head: int, **kw: Any) -> Any:
        """The quantizer's store of one kv head (``head_store`` where the quantizer's parameters differ per head,
        as RateQuant's widths; else its layer store for a sub-layer of one kv head and its query group)."""
        make = getattr(self.quantizer, "head_store", None)
        if make is not None:
            return make(self.layer, head, **kw)
        L = self.layer
        sub = LayerSpec(layer_idx=L.layer_idx, n_layers=L.n_layers, n_q_heads=L.n_groups, n_kv_heads=1,
                        head_dim=L.head_dim, nominal_dtype=L.nominal_dtype)
        return self.quantizer.new_layer(sub, **kw)

    def fork(self) -> ComposedStore:
        new = copy.copy(self)
        new.prefill = None if self.prefill is None else self.prefill.fork()
        new.store = None if self.store is None else self.store.fork()
        return new

    def stats(self) -> KVStats:
        return (self.prefill if self.store is None else self.store).stats()

    # -- CUDA-graph protocol (graph_safe: the quantizer's store implements it) ----------------------
    def graph_snapshot(self) -> Any:
        return self.store.graph_snapshot()

    def graph_restore(self, snap: Any) -> None:
        self.store.graph_restore(snap)

    def graph_advance(self, steps: int) -> None:
        self.store.graph_advance(steps)


class HeadStores(PartsGraphState):
    """One layer as one store per kv head (each serving its query group), for selections whose heads keep
    different counts. ``extend`` slices each head's queries and K/V, runs its store and concatenates the outputs
    (device ops only); ``kernel`` is fused and the step graph-safe when every head's store is."""

    def __init__(self, layer: LayerSpec, stores: list[Any]):
        self.layer, self.stores = layer, stores
        self.kernel = "fused" if all(getattr(st, "kernel", "reference") == "fused" for st in stores) else "reference"
        self.graph_safe = all(getattr(st, "graph_safe", False) for st in stores)

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        g = self.layer.n_groups
        outs = [st.extend(q[:, h * g : (h + 1) * g].contiguous(), k[:, h : h + 1].contiguous(),
                          v[:, h : h + 1].contiguous(), positions=positions, valid=valid, scaling=scaling)
                for h, st in enumerate(self.stores)]  # each (B, T, g, D)
        return torch.cat(outs, dim=2)  # (B, T, H_q, D)

    def end_of_context(self) -> None:
        for st in self.stores:
            st.end_of_context()

    def fork(self) -> HeadStores:
        return HeadStores(self.layer, [st.fork() for st in self.stores])

    def stats(self) -> KVStats:
        parts = [st.stats() for st in self.stores]
        return KVStats(
            tokens_kept=torch.cat([p.tokens_kept for p in parts], dim=1),  # (B, H_kv)
            tokens_seen=parts[0].tokens_seen,  # (B,) every head of a row has seen the same tokens
            bytes_stored=sum(p.bytes_stored for p in parts),
            bytes_allocated=sum(p.bytes_allocated for p in parts),
            bytes_read_per_step=sum(p.bytes_read_per_step for p in parts),
            bytes_full=sum(p.bytes_full for p in parts),
        )

    def graph_parts(self) -> list:  # the CUDA-graph protocol: each head's store (PartsGraphState)
        return self.stores
