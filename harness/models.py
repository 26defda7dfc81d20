"""Tiny model configs built in code (no download): parity checks, tests, speed at small scale."""

from __future__ import annotations

from typing import Any

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(arch: str, *, vocab_size: int = 256, n_layers: int = 2, **overrides: Any) -> Any:
    """A small random-init config of ``arch`` with grouped-query attention (4 query heads, 2 kv
    heads, head_dim 32) and every layer full attention."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        kw["use_sliding_window"] = False
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def build_random_model(config: Any, *, seed: int = 0, dtype: Any = None) -> Any:
    """A randomly initialised causal LM from ``config`` (deterministic by ``seed``), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
