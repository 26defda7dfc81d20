"""kvbench tasks: synthetic long-context retrieval generators, perplexity documents, lm-eval task YAMLs.

- :mod:`tasks.synthetic`: pure-Python, tokenizer-agnostic generators (``make_samples``,
  ``make_ppl_docs``, ``score``).
- :mod:`tasks.datasets`: lm-eval ``custom_dataset`` functions, one per task.
- :mod:`tasks.datasets` also holds lm-eval's ``process_results``.
- ``*.yaml`` in this folder: lm-eval tasks ``kvbench_<task>`` and ``kvbench_ppl``; load them with
  ``lm_eval.tasks.TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={...})``.

Importing this package imports nothing heavy (no torch, transformers, datasets or lm-eval).
"""

from __future__ import annotations

from pathlib import Path

TASK_DIR: Path = Path(__file__).resolve().parent
"""The folder holding the lm-eval task YAMLs (pass it as ``include_path``)."""

LM_EVAL_PREFIX = "kvbench_"
"""lm-eval task name of synthetic task ``t``: ``LM_EVAL_PREFIX + t``; perplexity is ``kvbench_ppl``."""


def lm_eval_task_name(task: str) -> str:
    """The lm-eval task name of a kvbench task (``niah_single`` -> ``kvbench_niah_single``)."""
    return task if task.startswith(LM_EVAL_PREFIX) else LM_EVAL_PREFIX + task
