"""Every setting of a run, checked once before the model loads.

Two kinds of problem, told apart because they end differently:

- :func:`check` finds *malformed* settings (``batch_size=0``, ``ratio=abc``, ``limit=-1``, a perplexity
  file that is not UTF-8 text, a model directory that does not exist). Each message names the setting,
  the value given and the values allowed. A single run exits 2; a multirun job writes a failed row.
- :func:`fit_problems` finds well-formed settings *this model cannot hold* (``context_length`` beyond
  its ``max_position_embeddings``). A single run exits 2; a multirun job writes a skipped row.

A ratio a method cannot honour is neither: it is the method's call (``MethodBase.ratio_reasons``) and
gives a skipped row (exit 0) in both cases.

This module imports neither torch nor transformers, so a bad command line fails in about a second.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TASK_DIR = REPO / "tasks"
DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PROTOCOLS = ("query_agnostic", "query_aware")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Setting:
    """One setting: its dotted key, the values it allows (in words) and the check."""

    key: str
    allowed: str
    ok: Callable[[Any], bool]
    nullable: bool = False
    optional: bool = False  # absent from the config is fine (a key some groups do not have)


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= n


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _rope_ok(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("rope_type"), str) and bool(v["rope_type"].strip())
            and _is_number(v.get("factor", 1.0)) and v.get("factor", 1.0) >= 1)


def rope_factor(model: dict[str, Any]) -> float:
    """How far ``model.rope`` stretches the model's window (1 without it): its ``factor``."""
    rope = model.get("rope") if isinstance(model, dict) else None
    return float(rope.get("factor", 1.0)) if isinstance(rope, dict) and _is_number(rope.get("factor", 1.0)) else 1.0


SCHEMA: tuple[Setting, ...] = (
    Setting("ratio", "a finite number: the target fraction of KV bytes removed, 0 <= ratio < 1 (a ratio a "
            "method cannot honour gives a skipped row)", _is_number),
    Setting("seed", "an integer >= 0", _int_at_least(0)),
    Setting("batch_size", "an integer >= 1 (prompts per engine call)", _int_at_least(1)),
    Setting("context_length", "an integer >= 1 (tokens per prompt)", _int_at_least(1)),
    Setting("limit", "an integer >= 1, or null for every sample", _int_at_least(1), nullable=True),
    Setting("protocol", " or ".join(PROTOCOLS), lambda v: v in PROTOCOLS),
    Setting("prefill_chunk", "an integer >= 1, or null (the whole context in one pass)", _int_at_least(1),
            nullable=True),
    Setting("ppl_chunk", "an integer >= 1 (tokens per perplexity chunk)", _int_at_least(1)),
    Setting("force", "true or false", _is_bool),
    Setting("progress", "true or false", _is_bool),
    Setting("results_dir", "a directory path", lambda v: isinstance(v, str) and bool(v.strip())),
    Setting("bench.enabled", "true or false", _is_bool),
    Setting("bench.batch_size", "an integer >= 1, or null (the run's batch_size)", _int_at_least(1), nullable=True),
    Setting("bench.context_length", "an integer >= 1 (tokens)", _int_at_least(1)),
    Setting("bench.decode_steps", "an integer >= 1", _int_at_least(1)),
    Setting("device.name", "auto, cpu, cuda or cuda:<index>", lambda v: isinstance(v, str) and bool(DEVICES.match(v))),
    Setting("model.name", "a name for the model's rows", lambda v: isinstance(v, str) and bool(v.strip())),
    Setting("model.path", "a local model directory or a Hugging Face id (null only for a model.gguf model)",
            lambda v: isinstance(v, str) and bool(v.strip()), nullable=True),
    Setting("model.dtype", ", ".join(DTYPES), lambda v: v in DTYPES, nullable=True, optional=True),
    Setting("model.max_length", "an integer >= 1, or null (the model's max_position_embeddings)", _int_at_least(1),
            nullable=True, optional=True),
    Setting("model.rope", "null, or RoPE scaling as transformers' rope_parameters, e.g. {rope_type: linear, "
            "factor: 4}: rope_type a string, factor a number >= 1 (the window grows by it)", lambda v: _rope_ok(v),
            nullable=True, optional=True),
    Setting("task.name", "a task name", lambda v: isinstance(v, str) and bool(v.strip())),
    Setting("task.file", "the path of a UTF-8 text file, or null", lambda v: isinstance(v, str) and bool(v.strip()),
            nullable=True, optional=True),
    Setting("logger.resync", "true or false", _is_bool, optional=True),
)
_MISSING = object()


def _get(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _show(v: Any) -> str:
    return "null" if v is None else json.dumps(v) if isinstance(v, str) else str(v)


def check(config: dict[str, Any]) -> list[str]:
    """Malformed settings of a resolved config, one message each ([] = all well-formed)."""
    problems = []
    failed: dict[str, Any] = {}
    for s in SCHEMA:
        v = _get(config, s.key)
        if s.key == "bench.context_length" and "context_length" in failed and v == failed["context_length"]:
            continue  # it follows ${context_length}: said once
        if v is _MISSING:
            if not s.optional:
                problems.append(f"{s.key} is missing: set it to {s.allowed}")
            continue
        if v is None and s.nullable:
            continue
        if not s.ok(v):
            failed[s.key] = v
            problems.append(f"{s.key}={_show(v)} is not allowed: use {s.allowed}")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    path = model.get("path")
    if path is None and not model.get("gguf") and "path" in model:
        problems.append("model.path=null is not allowed: use a local model directory or a Hugging Face id "
                        "(null only for a model converted from a GGUF, model.gguf)")
    if isinstance(path, str) and path.strip():
        p = local_model_dir(path)
        if p is not None and not p.is_dir():
            problems.append(f"model.path={_show(path)}: the directory {p} does not exist; point model.path at a "
                            "local directory holding config.json, the weights and the tokenizer")
    file = _get(config, "task.file")
    if isinstance(file, str) and file.strip():
        from tasks.synthetic import read_text_file

        try:
            read_text_file(Path(file))
        except (OSError, ValueError) as e:
            problems.append(f"task.file={_show(file)}: {e}")
    return problems


def local_model_dir(path: str) -> Path | None:
    """Where ``model.path`` points when it names a local directory (repo-relative paths such as
    ``models/kvbench-tiny`` resolve against the repository), else None: a Hugging Face id such as
    ``meta-llama/Llama-3.1-8B-Instruct``, loaded from the local hub cache."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if (REPO / p).exists():
        return REPO / p
    if p.exists():
        return p.resolve()
    parts = Path(path).parts
    looks_local = (path.startswith((".", "~")) or len(parts) > 2 or path.endswith("/")
                   or (len(parts) == 2 and ((REPO / parts[0]).is_dir() or Path(parts[0]).is_dir())))
    return (REPO / p if (REPO / parts[0]).is_dir() else p.resolve()) if looks_local else None


def model_config_json(model: dict[str, Any]) -> tuple[dict, str] | None:
    """(config.json contents, where it was read) of the model a run will load, without loading it:
    a local directory, or the local Hugging Face cache for a hub id; None when neither has it."""
    path = str(model.get("path") or "")
    d = local_model_dir(path)
    file: Path | None = d / "config.json" if d is not None else None
    if d is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(path, "config.json", revision=model.get("revision"))
            file = Path(hit) if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - no cache, no hub library: the check after loading covers it
            file = None
    if file is None or not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8")), str(file)
    except (OSError, ValueError):
        return None


def max_positions(config_json: dict) -> int | None:
    """``max_position_embeddings`` of a config.json (its text config for multimodal models)."""
    for node in (config_json, config_json.get("text_config") or {}):
        v = node.get("max_position_embeddings") if isinstance(node, dict) else None
        if _is_int(v) and v > 0:
            return v
    return None


def _load_task_yaml(text: str) -> Any:
    """An lm-eval task YAML with ``!function`` and other tags read as null (only plain keys are wanted)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, tag, node: None)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def generation_reserve(task: dict[str, Any]) -> int:
    """Tokens a kvbench task may generate after its prompt (``max_gen_toks`` of its lm-eval YAML);
    0 for perplexity and for lm-eval's own tasks (their budget is known only once loaded)."""
    name = str(task.get("lm_eval_task") or "")
    if task.get("builtin") or not name.startswith("kvbench_"):
        return 0
    path = TASK_DIR / f"{name[len('kvbench_'):]}.yaml"
    if not path.is_file():
        return 0
    try:
        spec = _load_task_yaml(path.read_text(encoding="utf-8")) or {}
    except Exception:  # noqa: BLE001 - an unreadable task YAML fails later with lm-eval's own message
        return 0
    gen = spec.get("generation_kwargs") or {}
    v = gen.get("max_gen_toks") if isinstance(gen, dict) else None
    return int(v) if _is_int(v) else 0


def window(config: dict[str, Any], max_pos: int | None) -> int | None:
    """The prompt + generation budget of a run: ``model.max_length`` when set, else max_position_embeddings."""
    ml = (config.get("model") or {}).get("max_length")
    return int(ml) if _is_int(ml) else max_pos


def fit_problems(config: dict[str, Any], *, max_pos: int | None = None, source: str | None = None) -> list[str]:
    """Well-formed settings the model cannot hold: the prompt (``context_length`` plus what the task
    generates) or the throughput probe (``bench.context_length + bench.decode_steps``) beyond its window.

    ``max_pos`` is read from the model's config.json when not given; unknown (a hub id not in the
    local cache) means no check here (the runner checks again once the model is loaded)."""
    model = config.get("model") or {}
    if max_pos is None:
        found = model_config_json(model)
        if found is None:
            return []
        max_pos, source = max_positions(found[0]), found[1]
        if max_pos is None:
            return []
        if rope_factor(model) != 1.0:  # the loader stretches the window by model.rope's factor (harness/loading.py)
            max_pos = int(max_pos * rope_factor(model))
            source = f"{source} x model.rope factor {rope_factor(model):g}"
    name = model.get("name")
    if source and Path(source).is_absolute() and Path(source).is_relative_to(REPO):
        source = str(Path(source).relative_to(REPO))
    where = f"max_position_embeddings in {source}" if source else "max_position_embeddings"
    problems = []
    ml = model.get("max_length")
    if _is_int(ml) and ml > max_pos:
        problems.append(f"model.max_length={ml} exceeds model {name}'s {max_pos} positions ({where}): the model "
                        f"cannot attend that far; use model.max_length <= {max_pos} or null")
    win = min(window(config, max_pos) or max_pos, max_pos)
    ctx = config.get("context_length")
    task = config.get("task") or {}
    reserve = generation_reserve(task)
    if _is_int(ctx) and ctx + reserve > win:
        gen = f" and task {task.get('name')} generates up to {reserve} tokens after it" if reserve else ""
        limit = "model.max_length" if _is_int(ml) and ml < max_pos else where
        problems.append(f"context_length={ctx} does not fit model {name}: it holds {win} positions ({limit}){gen}; "
                        f"use context_length <= {win - reserve}")
    bench = config.get("bench") or {}
    bctx, steps = bench.get("context_length"), bench.get("decode_steps")
    if bench.get("enabled") and _is_int(bctx) and _is_int(steps) and bctx + steps > win:
        if not (bctx == ctx and problems):  # bench.context_length follows context_length: said once
            problems.append(f"the throughput probe needs bench.context_length={bctx} + bench.decode_steps={steps} "
                            f"positions, more than model {name} holds ({win}: {where}); use bench.context_length "
                            f"<= {win - steps}")
    return problems
