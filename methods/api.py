"""The contract between the harness and KV-cache methods (docs/ARCHITECTURE.md §4).

The harness drives the model with ``past_key_values=None`` and routes every attention call to the
run's :class:`KVState`; each layer's :class:`LayerKV` owns its storage layout (dense, packed codes,
ragged per-head lengths, an index), so memory savings are physical, never simulated by masking.

Names in shape comments: B batch, H_q query heads, H_kv key/value heads, T new tokens, S stored
slots, D head dim, L layers.

This module is import-light: it defines types only and does no torch work at import time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor

FAMILIES = ("none", "quantization", "eviction", "sparse", "composed")
MEMORY_KINDS = ("physical", "simulated")
KERNELS = ("reference", "fused")


@dataclass(frozen=True)
class LayerSpec:
    """What a store needs to know about the layer it serves."""

    layer_idx: int
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    nominal_dtype: str = "bfloat16"  # the dtype a deployment stores full-precision K/V in

    @property
    def n_groups(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.n_q_heads // self.n_kv_heads


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only model, read from its Hugging Face config.

    ``layer_types`` follows transformers' ``config.layer_types`` ("full_attention",
    "sliding_attention", ...). Configs without that field (Llama, Mistral) are all full attention
    unless ``sliding_window`` is set below ``max_position_embeddings`` (Mistral-7B-v0.1 style).
    """

    name: str
    model_type: str
    n_layers: int
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    layer_types: tuple[str, ...]
    nominal_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any, *, name: str = "") -> ModelSpec:
        """Build the spec of a transformers ``PretrainedConfig`` (text config for multimodal ones)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = int(cfg.num_hidden_layers)
        n_q = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_q)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q)
        max_pos = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is None:
            window = getattr(cfg, "sliding_window", None)
            sliding = window is not None and (max_pos == 0 or int(window) < max_pos)
            layer_types = ["sliding_attention" if sliding else "full_attention"] * n_layers
        dtype = getattr(cfg, "dtype", None) or "bfloat16"
        dtype = str(dtype).replace("torch.", "")
        if dtype == "float32":  # random-init configs default to fp32; deployments store bf16
            dtype = "bfloat16"
        extra = {
            "final_logit_softcapping": getattr(cfg, "final_logit_softcapping", None),
            "attn_logit_softcapping": getattr(cfg, "attn_logit_softcapping", None),
            "is_encoder_decoder": bool(getattr(cfg, "is_encoder_decoder", False)),
        }
        return cls(
            name=name or str(getattr(cfg, "_name_or_path", "") or cfg.model_type),
            model_type=str(cfg.model_type),
            n_layers=n_layers,
            n_q_heads=n_q,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            hidden_size=int(cfg.hidden_size),
            vocab_size=int(cfg.vocab_size),
            max_position_embeddings=max_pos,
            layer_types=tuple(str(t) for t in layer_types),
            nominal_dtype=dtype,
            extra=extra,
        )

    def layer(self, layer_idx: int) -> LayerSpec:
        return LayerSpec(
            layer_idx=layer_idx,
            n_layers=self.n_layers,
            n_q_heads=self.n_q_heads,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            nominal_dtype=self.nominal_dtype,
        )


def engine_reasons(model: ModelSpec) -> list[str]:
    """Reasons the engine cannot drive ``model`` at all, whatever the method ([] = ok).

    Every method's ``validate`` starts from these (see :class:`MethodBase`).
    """
    reasons: list[str] = []
    other = sorted({t for t in model.layer_types if t != "full_attention"})
    if other:
        n = sum(t != "full_attention" for t in model.layer_types)
        reasons.append(
            f"model {model.name!r} has {n} of {model.n_layers} layers of type {other}; kvbench drives "
            "decoder-only models whose layers are all full attention (config.layer_types)"
        )
    if len(model.layer_types) != model.n_layers:
        reasons.append(f"config.layer_types has {len(model.layer_types)} entries for {model.n_layers} layers")
    if model.n_q_heads % model.n_kv_heads:
        reasons.append(f"{model.n_q_heads} query heads are not a multiple of {model.n_kv_heads} kv heads")
    if model.extra.get("is_encoder_decoder"):
        reasons.append("encoder-decoder models are not supported; kvbench drives decoder-only models")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if model.extra.get(key):
            reasons.append(f"{key} is set; the engine does not implement logit soft-capping")
    return reasons


@dataclass
class KVStats:
    """What one store (one layer) holds, measured, not computed from a formula.

    ``bytes_stored`` is the sum over every tensor reachable from the store (codes, scales, zero
    points, norms, positions, scores, index), counting only the slots that hold kept tokens for
    tensors with a token axis; ``bytes_allocated`` counts every slot, including decode capacity
    reserved ahead. Floating-point tensors held in the compute dtype are counted at the model's
    nominal dtype (a CPU run computes in fp32, a deployment stores bf16), so CPU and GPU rows agree.
    """

    tokens_kept: Tensor  # (B, H_kv) int64: tokens each kv head holds now (summed over layers in a KVState)
    tokens_seen: Tensor  # (B,) int64: valid tokens that entered the store (likewise)
    bytes_stored: int
    bytes_allocated: int
    bytes_read_per_step: int  # bytes one decode step reads from this store
    bytes_full: int  # the same tokens_seen in a dense cache at the nominal dtype

    def __add__(self, other: KVStats) -> KVStats:
        return KVStats(
            tokens_kept=self.tokens_kept + other.tokens_kept,
            tokens_seen=self.tokens_seen + other.tokens_seen,
            bytes_stored=self.bytes_stored + other.bytes_stored,
            bytes_allocated=self.bytes_allocated + other.bytes_allocated,
            bytes_read_per_step=self.bytes_read_per_step + other.bytes_read_per_step,
            bytes_full=self.bytes_full + other.bytes_full,
        )


@runtime_checkable
class LayerKV(Protocol):
    """One layer's KV store. Created by :meth:`KVMethod.new_layer`, driven by the engine."""

    def extend(self, q: Tensor, k: Tensor, v: Tensor, *, positions: Tensor, valid: Tensor, scaling: float) -> Tensor:
        """Append T tokens and return their attention output.

        q (B, H_q, T, D); k, v (B, H_kv, T, D) after RoPE; positions (B, T) absolute;
        valid (B, T) bool, False = padding (never stored, never attended to).
        Returns (B, T, H_q, D). The T new tokens attend to each other exactly (causal) and to
        earlier tokens in the form the store keeps them (quantized, evicted, indexed), as a
        chunked-prefill serving engine does. When T == 1 the call must not synchronise with the
        host and must keep static shapes (a later CUDA-graph decode step depends on it).
        """
        ...

    def end_of_context(self) -> None:
        """The context is complete: prefill-time compression happens here (selection, index
        build, bit allocation). An evicting store compacts to kept + decode budget and frees its
        prefill buffer, so peak memory during decode really drops."""
        ...

    def fork(self) -> LayerKV:
        """An independent copy: compress a context once, then score several continuations."""
        ...

    def stats(self) -> KVStats:
        """What the store holds now (see :class:`KVStats`)."""
        ...


@dataclass
class CalibrationContext:
    """What :meth:`KVMethod.calibrate` may use: the model, calibration token sequences and a way
    to run them through the engine with a given method (e.g. to capture K/V or fit a distortion
    model). ``artifacts_dir`` is where a method may cache what it learned (per model)."""

    model: Any  # a transformers PreTrainedModel
    spec: ModelSpec
    samples: Sequence[Tensor]  # each (T,) int64 token ids
    device: Any
    dtype: Any
    seed: int = 0
    artifacts_dir: str = "results/calibration"
    run: Callable[..., Any] | None = None  # run(method, samples) -> per-sample outputs (engine)
    make_samples: Callable[[int, int], Sequence[Tensor]] | None = None  # (n, length) -> held-out token ids
    prefill_chunk: int | None = None  # tokens per prefill pass of ``run`` (the run's prefill_chunk; None = whole)


@runtime_checkable
class KVMethod(Protocol):
    """A KV-cache compression method: its fields are its hyperparameters (see docs/ARCHITECTURE.md §8)."""

    family: ClassVar[str]  # "none" | "quantization" | "eviction" | "sparse" | "composed"
    memory: ClassVar[str]  # "physical" | "simulated"
    kernel: ClassVar[str]  # "reference" | "fused"
    ratio: float  # target fraction of KV bytes removed; each method maps it onto its own knob

    def validate(self, model: ModelSpec) -> list[str]:
        """Reasons this method cannot run on ``model`` at this ratio; [] = ok."""
        ...

    def ratio_reasons(self) -> list[str]:
        """Reasons this method cannot honour its ratio on any model; [] = ok (see MethodBase)."""
        ...

    def calibrate(self, ctx: CalibrationContext) -> None:
        """Optional one-time fit (RateQuant's distortion curves, LKV's weights)."""
        ...

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> LayerKV:
        """A store for one layer; ``capacity`` bounds the slots any row needs (context + question
        + decode), so a store can allocate its decode capacity once."""
        ...


class MethodBase:
    """Shared defaults for method dataclasses: engine checks in ``validate``, no calibration,
    ``params()`` for the row's ``method_params``. Subclasses are ``@dataclass`` es."""

    family: ClassVar[str] = "none"
    memory: ClassVar[str] = "physical"
    kernel: ClassVar[str] = "reference"
    name: ClassVar[str] = ""

    def ratio_reasons(self) -> list[str]:
        """Reasons this method cannot honour its ``ratio`` on any model ([] = it can): one rule for every
        method, checked by the runner before the model loads (a skipped row with the reason).

        ``ratio`` is the target fraction of KV bytes removed, so 0 <= ratio < 1. A method that honours
        fewer ratios (a bit width it cannot store, ``full`` only 0) overrides this and extends it."""
        r = self.ratio  # type: ignore[attr-defined]
        label = self.name or type(self).__name__
        if isinstance(r, bool) or not isinstance(r, (int, float)) or r != r or r in (float("inf"), float("-inf")):
            return [f"{label}: ratio must be a finite number, got {r!r}"]
        if not 0.0 <= float(r) < 1.0:
            return [f"{label} cannot honour ratio {r}: ratio is the fraction of KV bytes removed, in [0, 1)"]
        return []

    def validate(self, model: ModelSpec) -> list[str]:
        return engine_reasons(model) + self.ratio_reasons()

    def calibrate(self, ctx: CalibrationContext) -> None:
        return None

    def params(self) -> dict[str, Any]:
        """Hyperparameters as a flat dict (everything but ``ratio``, which has its own column)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "ratio"}


class KVState:
    """The run's KV state: one store per layer plus the positions and validity of the tokens the
    current forward pass carries. The engine passes it to the model as ``kv_state=...``."""

    def __init__(self, layers: list[LayerKV]):
        self.layers = layers
        self.positions: Tensor | None = None  # (B, T)
        self.valid: Tensor | None = None  # (B, T) bool
        self.attention_calls = 0

    def __iter__(self) -> Iterator[LayerKV]:
        return iter(self.layers)

    def end_of_context(self) -> None:
        for layer in self.layers:
            layer.end_of_context()

    def fork(self) -> KVState:
        return KVState([layer.fork() for layer in self.layers])

    @property
    def kernel(self) -> str:
        """``"fused"`` when every layer's store runs fused kernels, else ``"reference"``."""
        return "fused" if all(getattr(layer, "kernel", "reference") == "fused" for layer in self.layers) else "reference"

    @property
    def graph_safe(self) -> bool:
        """Every store's decode step can be captured in a CUDA graph (``graph_safe`` stores implement
        ``graph_snapshot`` / ``graph_restore`` / ``graph_advance``, see methods.stores.FusedDenseStore)."""
        return all(getattr(layer, "graph_safe", False) for layer in self.layers)

    def stats(self) -> KVStats:
        total = None
        for layer in self.layers:
            s = layer.stats()
            total = s if total is None else total + s
        assert total is not None, "a KVState has at least one layer"
        return total


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (imports torch lazily)."""
    import torch

    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use e.g. bfloat16, float16, float32")
    return dt
