"""lm-eval ``custom_dataset`` functions for the kvbench tasks (one per task YAML).

lm-eval 0.4.13 calls ``custom_dataset(**metadata, **dataset_kwargs)`` and expects
``{"test": datasets.Dataset}``. ``metadata`` is the task YAML's ``metadata`` (``version``) merged with
the ``metadata`` given to ``TaskManager(metadata=...)`` and lm-eval's own ``config_source``; when
``simple_evaluate`` builds the TaskManager itself it also merges the parsed ``model_args``. Keys read
here (all others are ignored):

- ``tokenizer``: a tokenizer object (``transformers`` tokenizer, ``tokenizers.Tokenizer``, anything
  with ``encode(text, add_special_tokens=False)``) or a local path / hub id loaded with
  ``AutoTokenizer.from_pretrained(..., local_files_only=True)``. ``pretrained`` (a string) is the
  fallback, as lm-eval's RULER tasks do. Required.
- ``context_length``: int, tokens of each prompt ``context + question`` (perplexity: of each document).
  Required.
- ``n`` (alias ``limit``): samples to generate, default 100.
- ``seed``: default 0. ``split``: ``"eval"`` (default) or ``"train"``.
- ``ppl_file``: perplexity only: a UTF-8 text file to cut into documents instead of synthetic filler.

lm-eval loads this file by path (not as ``tasks.datasets``), so the sibling modules are imported
through :func:`_synthetic`, and heavy libraries (``datasets``, ``transformers``) only inside functions.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent


def _synthetic() -> ModuleType:
    """``tasks.synthetic``, also when lm-eval loaded this file by path outside its package."""
    try:
        import tasks.synthetic as mod

        if Path(mod.__file__).resolve().parent == _HERE:
            return mod
    except ImportError:
        pass
    name = "_kvbench_tasks_synthetic"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "synthetic.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """A tokenizer from a local directory or the local hub cache; never downloads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(
            f"tokenizer {name!r} is not available offline: pass a local directory holding the tokenizer "
            f"files, download it once beforehand (`hf download {name}`), or pass a tokenizer object as "
            f"metadata['tokenizer'] ({e})"
        ) from e


def resolve_tokenizer(kw: dict):
    """The tokenizer object named by metadata ``tokenizer`` (object or string) or ``pretrained``."""
    tok = kw.get("tokenizer")
    if tok is None or (isinstance(tok, str) and not tok):
        tok = kw.get("pretrained") if isinstance(kw.get("pretrained"), str) else None
    if tok is None:
        raise ValueError(
            "kvbench tasks size every prompt in the model's tokens and need a tokenizer: pass "
            "TaskManager(metadata={'tokenizer': <tokenizer object or local path>, 'context_length': 4096})"
        )
    if isinstance(tok, (str, os.PathLike)):
        return load_tokenizer(str(tok))
    return tok


def _options(kw: dict, what: str) -> dict:
    """The generator arguments read from lm-eval's merged metadata."""
    length = kw.get("context_length")
    if length is None:
        raise ValueError(
            f"{what}: metadata 'context_length' (tokens per prompt) is missing: pass "
            "TaskManager(metadata={'tokenizer': ..., 'context_length': 4096})"
        )
    n = kw.get("n", kw.get("limit"))
    return {
        "tokenizer": resolve_tokenizer(kw),
        "context_length": int(length),
        "n": 100 if n is None else int(n),
        "seed": int(kw.get("seed", 0)),
        "split": str(kw.get("split", "eval")),
    }


def _to_dataset(rows: list[dict]) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def synthetic_dataset(task: str, **kw) -> dict:
    """``{"test": Dataset}`` of ``n`` samples of synthetic ``task`` (fields of ``make_samples``), made once
    per process for a tokenizer object (``tasks.synthetic.SAMPLES``: a grid's cells share them)."""
    return _to_dataset(_synthetic().SAMPLES.samples(task, **_options(kw, f"kvbench_{task}")))


# One entry point per task YAML (`custom_dataset: !function datasets.<task>`); lm-eval calls it with the
# metadata as keyword arguments.
niah_single = functools.partial(synthetic_dataset, "niah_single")
niah_multikey = functools.partial(synthetic_dataset, "niah_multikey")
niah_multivalue = functools.partial(synthetic_dataset, "niah_multivalue")
niah_multiquery = functools.partial(synthetic_dataset, "niah_multiquery")
variable_tracking = functools.partial(synthetic_dataset, "variable_tracking")
common_words = functools.partial(synthetic_dataset, "common_words")
kv_retrieval = functools.partial(synthetic_dataset, "kv_retrieval")


def ppl(**kw) -> dict:
    """lm-eval dataset of ``kvbench_ppl``: documents (``id``, ``text``, ``num_tokens``) for perplexity."""
    opts = _options(kw, "kvbench_ppl")
    count = _synthetic().token_counter(opts.pop("tokenizer"))
    return _to_dataset(_synthetic().make_ppl_docs(**opts, count_tokens=count, file=kw.get("ppl_file")))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results``: ``{"accuracy": fraction of the doc's answers found in the
    generation}`` (RULER's string_match_all)."""
    prediction = results[0] if results else ""
    return {"accuracy": _synthetic().score(doc["task"], prediction, list(doc["answers"]))}
