"""Calibration data and engine access for ``KVMethod.calibrate`` (and scripts that study K/V).

- :func:`calibration_samples`: held-out text, token ids: the synthetic ``ppl`` filler generator
  on its ``train`` split (random streams that never meet the ``eval`` split the tasks score on),
  deterministic by seed.
- :func:`engine_runner`: ``run(method, samples)`` -> one :class:`GenerationOutput` per sample, each
  sample prefilled as one context through the engine with ``method``'s stores (what
  :class:`methods.api.CalibrationContext` calls ``run``).
- :func:`capture_qkv`: the post-RoPE q, k, v of every layer for each sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def calibration_samples(tokenizer: Any, *, n: int = 4, length: int = 512, seed: int = 0) -> list[Tensor]:
    """``n`` held-out documents of about ``length`` tokens each, as (T,) int64 token ids."""
    from tasks.synthetic import make_ppl_docs, token_counter

    docs = make_ppl_docs(count_tokens=token_counter(tokenizer), context_length=length, n=n, seed=seed,
                         split="train")
    out = []
    for d in docs:
        ids = tokenizer.encode(d["text"], add_special_tokens=False)
        out.append(torch.tensor(list(ids)[:length], dtype=torch.long))
    return out


def engine_runner(model: Any, *, prefill_chunk: int | None = None):
    """``run(method, samples)``: prefill each sample (one context, one generated token) with ``method``."""
    from .engine import Engine, Prompt

    def run(method: Any, samples: Sequence[Tensor]) -> list[Any]:
        # one new token: no decode step runs, so no fused decode step is needed (a fresh process's first engine
        # builds it and self-tests its kernels, compiling them: RateQuant's capture took 3.7 s of its 4.4 s
        # calibration of the 8B shape on an H100 in a fresh process, its fit 0.7 s)
        engine = Engine(model, method, prefill_chunk=prefill_chunk, fused_layers="off")
        return [engine.generate([Prompt(context=s.tolist())], max_new_tokens=1) for s in samples]

    return run


def capture_qkv(model: Any, samples: Sequence[Tensor]) -> list[list[tuple[Tensor, Tensor, Tensor]]]:
    """Per sample, per layer: (q (1, H_q, T, D), k (1, H_kv, T, D), v (1, H_kv, T, D)), post-RoPE, fp32."""
    from methods.capture import Capture

    out = []
    for s in samples:
        cap = Capture()
        engine_runner(model)(cap, [s])
        out.append([(q.float(), k.float(), v.float()) for q, k, v in cap.captured])
    return out
