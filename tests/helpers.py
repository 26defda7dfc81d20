"""Shared test utilities."""

from __future__ import annotations

import copy

import torch

from harness.engine import Engine, Prompt


def random_prompts(lengths, *, vocab=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run(model, method, prompts, *, n_new=8, chunk=None, questions=None, protocol="query_agnostic"):
    """Run prompts as one batch through a private copy of ``model``."""
    engine = Engine(copy.deepcopy(model), method, prefill_chunk=chunk)
    qs = questions or [()] * len(prompts)
    return engine.generate(
        [Prompt(context=p, question=q) for p, q in zip(prompts, qs)],
        max_new_tokens=n_new,
        return_logits=True,
        protocol=protocol,
    )
