"""Parity of the engine against Hugging Face's own path (docs/ARCHITECTURE.md §3).

Each prompt runs alone through transformers (sdpa attention, DynamicCache, one-shot prefill, greedy
decode); the whole batch runs through our engine (right-padded phases, chunked prefill, the
method's stores). With ``method=full`` the tokens must match and the logits agree to float error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from methods.api import KVMethod

from .engine import Engine, Prompt
from .models import build_random_model, tiny_config


def hf_greedy(model: Any, ids: list[int], n_new: int) -> tuple[list[int], torch.Tensor]:
    """Hugging Face's path for one prompt: prefill + greedy steps with a DynamicCache.
    Returns (tokens, logits (n_new, V) fp32)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    tokens, logits_all = [], []
    with torch.inference_mode():
        out = model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True)
        for i in range(n_new):
            logits = out.logits[0, -1].float()
            tok = int(logits.argmax())
            tokens.append(tok)
            logits_all.append(logits)
            if i == n_new - 1:
                break
            p = len(ids) + i
            out = model(input_ids=torch.tensor([[tok]]), position_ids=torch.tensor([[p]]), past_key_values=cache, use_cache=True)
    return tokens, torch.stack(logits_all)


# A ratio each family honours on the tiny parity models, when none is given.
DEFAULT_RATIO = {"none": 0.0, "quantization": 0.75, "eviction": 0.5, "sparse": 0.5, "composed": 0.875}


def make_method(name: str, ratio: float | None = None) -> KVMethod:
    """A catalogue method (conf/method/<name>.yaml) at ``ratio`` (default: its family's in DEFAULT_RATIO)."""
    from methods import catalog

    entry = catalog.get(name)  # CatalogError (a ValueError) names the available methods
    return entry.build(ratio=DEFAULT_RATIO.get(entry.family, 0.5) if ratio is None else ratio)


def run_parity(
    *,
    arch: str,
    lengths: list[int],
    prefill_chunk: int | None = None,
    method: str = "full",
    ratio: float | None = None,
    n_new: int = 16,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare HF (each prompt alone) with our engine (the batch); returns the JSON-able report.
    ``log`` receives a line at the start of each step (the CLI prints them on stderr)."""
    from transformers import DynamicCache

    say = log or (lambda msg: None)
    say(f"building a random {arch} model (seed {seed})")
    config = tiny_config(arch)
    model = build_random_model(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    reference = []
    for i, p in enumerate(prompts, 1):
        say(f"Hugging Face reference, prompt {i}/{len(prompts)} ({len(p)} tokens, {n_new} greedy steps)")
        reference.append(hf_greedy(model, p, n_new))
    say(f"kvbench engine, method {method}: the {len(prompts)} prompts as one batch")

    ours_model = copy.deepcopy(model)  # kvbench attention is set on this model only
    created = {"n": 0}
    original_init = DynamicCache.__init__

    def counting_init(self, *a, **kw):  # the model's own cache must never be built in our path
        created["n"] += 1
        original_init(self, *a, **kw)

    DynamicCache.__init__ = counting_init
    try:
        engine = Engine(ours_model, make_method(method, ratio), prefill_chunk=prefill_chunk)
        out = engine.generate([Prompt(context=p) for p in prompts], max_new_tokens=n_new, return_logits=True)
    finally:
        DynamicCache.__init__ = original_init

    diffs, match = [], True
    for (ref_tokens, ref_logits), toks, logits in zip(reference, out.tokens, out.logits):
        match &= toks == ref_tokens
        # compare logits while both paths share the same history: up to the first differing token
        n = min(len(logits), len(ref_logits))
        first_diff = next((i for i in range(n) if i >= len(toks) or toks[i] != ref_tokens[i]), n - 1)
        n = first_diff + 1
        diffs.append(float((logits[:n] - ref_logits[:n]).abs().max()))
    return {
        "arch": arch,
        "lengths": lengths,
        "prefill_chunk": prefill_chunk,
        "method": method,
        "max_abs_logit_diff": max(diffs),
        "tokens_match": bool(match),
        "our_attention_calls": out.attention_calls,
        "expected_attention_calls": engine.spec.n_layers * out.n_forward,
        "model_cache_created": created["n"] > 0,
        "reference_attn_implementation": model.config._attn_implementation,
    }
