"""Route a loaded model's attention to the run's KV state.

transformers computes q, k, v (RoPE, q/k norms, biases: whatever the architecture does) and then
calls the attention function registered under ``config._attn_implementation``. We register our own
name, ``kvbench``, with an attention function that hands the call to
``kv_state.layers[module.layer_idx].extend(...)`` and a mask function that builds no mask
(causality and padding are the stores' business). Registration happens on the first
:func:`install`, never at import, and adds a new name only: no built-in implementation is patched,
and only models passed to :func:`install` switch to it.
"""

from __future__ import annotations

from typing import Any

ATTN_NAME = "kvbench"
_registered = False


def kvbench_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    kv_state: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """query (B, H_q, T, D); key, value (B, H_kv, T, D) after RoPE -> ((B, T, H_q, D), None)."""
    if kv_state is None:
        raise RuntimeError(
            "this model's attention is routed to kvbench (set_attn_implementation('kvbench')); run it "
            "through harness.engine.Engine, which passes kv_state=..., or switch it back with "
            "model.set_attn_implementation('sdpa')"
        )
    if dropout:
        raise RuntimeError("kvbench attention is inference-only; call model.eval() first")
    kv_state.attention_calls += 1
    layer = kv_state.layers[module.layer_idx]
    positions, valid = kv_state.positions, kv_state.valid
    if positions is not None and positions.device != query.device:  # a layer on another device (device=split)
        positions, valid = positions.to(query.device), valid.to(query.device)
    with _on_device(query.device):
        out = layer.extend(
            query,
            key,
            value,
            positions=positions,
            valid=valid,
            scaling=float(scaling if scaling is not None else module.scaling),
        )
    return out, None


def _on_device(device: Any) -> Any:
    """The store's Triton kernels launch on the current CUDA device: make it the layer's (device=split)."""
    import contextlib

    import torch

    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def no_mask(*args: Any, **kwargs: Any) -> None:
    """Mask function for our implementation: build nothing, the stores mask themselves."""
    return None


def register() -> None:
    """Register ``kvbench`` with transformers' attention and mask interfaces (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kvbench_attention)
    AttentionMaskInterface.register(ATTN_NAME, no_mask)
    _registered = True


def install(model: Any) -> None:
    """Switch this model (only this one) to kvbench attention."""
    register()
    model.set_attn_implementation(ATTN_NAME)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise RuntimeError(f"could not switch {type(model).__name__} to {ATTN_NAME!r} attention")
