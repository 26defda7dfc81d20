"""``python -m harness.run``: one run = model x method x ratio x task -> one tidy row.

    python -m harness.run method=streaming_llm ratio=0.5 task=niah_single limit=4
    python -m harness.run -m method=uniform_int,streaming_llm ratio=0.5,0.75 task=niah_single,niah_multikey

Every run (ok, skipped or failed) writes one row to ``results/runs/<run_id>.json`` (its per-sample
predictions to ``results/samples/<run_id>.jsonl.gz``), prints a one-line summary on stderr and the row as
the last stdout line. A run whose ok row exists is skipped (``force=true`` reruns it).

How a run ends (README, "When a run goes wrong"):

- exit 2, no row: the command line is wrong (an unknown option or setting, a malformed value, a context
  the model cannot hold, ``method._target_``); the message names the setting and what it allows. Every
  setting is checked before the model loads (:mod:`harness.settings`).
- a skipped row (exit 0): the run is well-formed but cannot run here (a ratio the method cannot honour,
  a model the engine does not drive, LKV without trained weights); ``reason`` says why.
- a failed row (exit 1): the run broke; ``reason`` holds the error, stderr the traceback.

In a multirun (``-m``) every job writes its row, malformed settings included (a failed row; a context
the model cannot hold is a skipped row), and the multirun exits 1 when any job failed, after all ran.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
GROUPS = ("model", "method", "task", "device", "logger", "sweep", "experiment")
TOP_LEVEL = ("ratio", "seed", "batch_size", "context_length", "limit", "protocol", "prefill_chunk", "ppl_chunk",
             "force", "progress", "results_dir", "bench")
FAMILY_SWEEP = {"none": "none_family", "quantization": "quantization", "eviction": "eviction", "sparse": "sparse",
                "composed": "composed"}
# Environment variables shared with the jobs of a multirun (they may run in other processes: joblib, SLURM).
JOB_LOG_ENV = "KVBENCH_JOB_LOG"  # each job appends {"run_id", "status"} here; the parent tallies them
SUPERVISED_ENV = "KVBENCH_SUPERVISED"  # set by harness.sweep: it reports an interruption itself


class UsageError(Exception):
    """Bad command-line input: exit 2 with a message that says what to do."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    """Refuse unknown group options, unknown top-level keys and instantiation keys before Hydra starts."""
    from methods.catalog import RESERVED

    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        root = key.split(".")[0].split("/")[0]
        if root == "hydra" or key.startswith("hydra/"):
            continue
        bad = [part for part in key.split(".") if part in RESERVED]
        if bad:
            raise UsageError(
                f"{key} cannot be set: {bad[0]} would make Hydra build an arbitrary object. Methods are built "
                f"only from the catalogue (conf/method/*.yaml): choose one with method=<name> "
                f"({', '.join(options('method'))}) and set its knobs with method.<knob>=<value>")
        if key in GROUPS:
            if any(c in value for c in "()[]*"):  # sweep functions: leave them to Hydra
                continue
            avail = options(key)
            for v in value.split(","):
                if v and v not in avail:
                    close = difflib.get_close_matches(v, avail, n=1)
                    hint = f"did you mean {close[0]}? " if close else ""
                    raise UsageError(f"unknown {key} {v!r}; {hint}available: {', '.join(avail)}")
        elif root not in GROUPS and root not in TOP_LEVEL:
            close = difflib.get_close_matches(root, list(GROUPS) + list(TOP_LEVEL), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UsageError(f"unknown setting {root!r}; {hint}settings: {', '.join(TOP_LEVEL)}; groups: {', '.join(GROUPS)}")


def usage_message(e: UsageError) -> str:
    """``error: ...`` for one problem; a list for several."""
    lines = str(e).splitlines()
    if len(lines) == 1:
        return f"error: {lines[0]}"
    return f"error: {len(lines)} problems, nothing ran:\n" + "\n".join(f"  - {line}" for line in lines)


def _log(msg: str) -> None:
    print(f"[kvbench] {msg}", file=sys.stderr, flush=True)


def _hydra_choice(group: str) -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests and sweeps compose configs directly)
        return None


def method_choice(method_cfg: dict[str, Any], name: str | None = None) -> tuple[str, dict[str, Any]]:
    """(catalogue name, knobs) of the run's method config. The name is the config group's choice (or
    ``name``); the config's ``_target_`` must be that entry's class, else the row would be labelled with
    a method that did not run. Raises :class:`methods.catalog.CatalogError`."""
    from methods import catalog

    knobs = dict(method_cfg)
    target = knobs.pop("_target_", None)
    if name is None:
        found = catalog.by_target(str(target))
        if len(found) != 1:
            raise catalog.CatalogError(f"method._target_={target!r} is not the class of a catalogue method; choose "
                                       f"one with method=<name> ({', '.join(catalog.names())})")
        name = found[0].name
    entry = catalog.get(name)
    if target is not None and target != entry.target:
        owners = [e.name for e in catalog.by_target(str(target))]
        hint = f" (that class is method={owners[0]})" if owners else ""
        raise catalog.CatalogError(
            f"method._target_={target!r} is not the class of method {name} ({entry.target}); a method is chosen by "
            f"name, not by overriding its class: use method=<name>{hint}")
    return name, knobs


def model_label(model_cfg: dict[str, Any]) -> str:
    """The row's ``model``: the config's name, unless ``model.path`` was pointed elsewhere than that
    config's own path; then the name of what was loaded (the directory's name, or the hub id)."""
    import yaml

    name = str(model_cfg.get("name"))
    path = str(model_cfg.get("path") or "")
    conf = CONF / "model" / f"{name}.yaml"
    if conf.is_file():
        own = (yaml.safe_load(conf.read_text(encoding="utf-8")) or {}).get("path")
        if own is not None and path and Path(str(own)) != Path(path):
            p = Path(path.rstrip("/"))
            from .settings import local_model_dir

            return p.name if local_model_dir(path) is not None else path
    return name


def summary_line(row: dict[str, Any], path: Any = None, *, metric: str | None = None) -> str:
    """One human-readable line per run: status, method, ratio, task, accuracy ± se, achieved ratio, decode ms."""

    def num(v: Any, fmt: str) -> str | None:
        return None if not isinstance(v, (int, float)) or isinstance(v, bool) else format(v, fmt)

    ratio = num(row.get("ratio"), "g") or row.get("ratio")
    head = f"{row.get('status', '?'):<7} {row.get('method')} ratio={ratio} {row.get('task')}@{row.get('context_length')}"
    parts = []
    if row.get("status") == "ok":
        acc, se = num(row.get("accuracy"), ".3f"), num(row.get("accuracy_stderr"), ".3f")
        if acc is not None:
            parts.append(f"{metric or 'accuracy'} {acc}{' ± ' + se if se else ''} (n={row.get('n_samples')})")
        if (a := num(row.get("ratio_achieved"), ".3f")) is not None:
            parts.append(f"achieved {a}")
        if (r := num(row.get("read_ratio_achieved"), ".3f")) is not None and row.get("family") == "sparse":
            parts.append(f"read {r}")
        if (d := num(row.get("decode_ms_p50"), ".2f")) is not None:
            parts.append(f"decode {d} ms/step ({row.get('kernel')})")
    if row.get("reason"):
        reason = " ".join(str(row["reason"]).split())
        parts.append(reason if len(reason) <= 240 else reason[:237] + "...")
    tail = f" -> {path}" if path else ""
    return f"{head}: {', '.join(parts)}{tail}" if parts else f"{head}{tail}"


def _task_metrics(results: dict, task_name: str, main_metric: str | None) -> dict[str, Any]:
    res = results["results"][task_name]
    metrics = {k.split(",")[0]: v for k, v in res.items() if "," in k and not k.endswith("_stderr,none")}
    stderrs = {k.split(",")[0][: -len("_stderr")]: v for k, v in res.items() if k.endswith("_stderr,none")}
    main = main_metric or next(iter(metrics), None)
    out: dict[str, Any] = {}
    if main is not None and main in metrics:
        out["accuracy"] = metrics[main]
        se = stderrs.get(main)
        out["accuracy_stderr"] = se if isinstance(se, (int, float)) else None
    for k, v in metrics.items():
        if k != main and isinstance(v, (int, float)):
            out[f"m.{k}"] = v
    return out


def _typed(value: Any, kind: type) -> Any:
    """``value`` when it has the column's type (a malformed setting's row keeps None there)."""
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


class _Skip(Exception):
    pass


def run_job(cfg: Any, *, method_name: str | None = None, strict: bool = False,
            probe_cache: dict | None = None) -> dict[str, Any]:
    """Run one configuration and return its row (written to results/runs/ before returning).

    ``probe_cache``: a dict kept by a caller that runs many jobs in one process (scripts/leaderboard.py):
    the throughput probe, which never sees the task, runs once per (model, method, ratio, probe shape,
    device) and later rows of other tasks copy its columns.

    ``strict`` (a single run from the command line): malformed settings and a context the model cannot
    hold raise :class:`UsageError` (exit 2, no row) before the model loads. Otherwise (a multirun job, a
    sweep) they give a failed or skipped row with the reason, so every job leaves its row."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from methods import catalog

    from . import settings as S

    problems: list[str] = []
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        problems.append(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}; set it on the command line")
        config = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(config, dict)
    if not problems:
        problems += S.check(config)
    method_cfg = config.get("method") if isinstance(config.get("method"), dict) else {}
    name = method_name or _hydra_choice("method")
    knobs: dict[str, Any] = {}
    try:
        name, knobs = method_choice(method_cfg, name)
    except catalog.CatalogError as e:
        problems.append(str(e))
    if strict and problems:
        raise UsageError("\n".join(problems))
    cannot = [] if problems else S.fit_problems(config)
    if strict and cannot:
        raise UsageError("\n".join(cannot))
    method = None
    if not problems and not cannot:
        try:
            method = catalog.build(str(name), ratio=float(config["ratio"]), **knobs)
        except catalog.CatalogError as e:
            problems.append(str(e))
        except (ValueError, TypeError) as e:  # a knob value the method's __post_init__ refuses
            problems.append(f"bad parameters for method {name}: {e}")
        if strict and problems:
            raise UsageError(problems[-1]) from None

    from . import loading
    from . import results as R

    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    run_id, revision = _identity(config, weights=not problems)
    results_dir = Path(str(config.get("results_dir") or "results"))  # relative to the working directory
    path = R.row_path(results_dir, run_id)
    existing = R.read_row(path)
    logger = config.get("logger") if isinstance(config.get("logger"), dict) else {}
    if existing and existing.get("status") == "ok" and not config.get("force"):
        _log(f"skipped: run {run_id} is already done ({path}); force=true reruns it")
        if logger.get("name") == "wandb":
            if logger.get("resync"):
                spath = R.samples_path(results_dir, run_id)
                _wandb(cfg.logger, config, existing, R.read_samples(spath) if spath.is_file() else [], path)
                _log("sent the existing row to W&B (logger.resync=true)")
            else:
                _log("logger=wandb sent nothing for it: logger.resync=true sends the existing row to W&B")
        return existing

    task_cfg = config.get("task") if isinstance(config.get("task"), dict) else {}
    row = R.new_row(
        run_id=run_id, model=model_label(model_cfg) if not problems else model_cfg.get("name"),
        model_revision=revision, weights=model_cfg.get("weights"), method=name,
        ratio=_typed(config.get("ratio"), float), task=task_cfg.get("name"), protocol=config.get("protocol"),
        context_length=_typed(config.get("context_length"), int), prefill_chunk=_typed(config.get("prefill_chunk"), int),
        batch_size=_typed(config.get("batch_size"), int), seed=_typed(config.get("seed"), int), status="failed",
        started_at=R.now(), config=json.dumps(R.strict(config), sort_keys=True, default=str),
    )
    samples: list[dict] = []
    ctx: dict[str, Any] = {"device": None}  # the device the run is on, for the row's env (failed rows too)
    try:
        ctx["device"] = loading.resolve_device(str((config.get("device") or {}).get("name")))
    except Exception:  # noqa: BLE001 - a malformed device.name is already a problem; a missing GPU, the load's
        pass
    if method is not None:
        row.update(family=method.family, memory=method.memory, kernel=method.kernel,
                   method_params=json.dumps(method.params(), sort_keys=True, default=str)
                   if hasattr(method, "params") else None)
    try:
        if problems:
            row.update(status="failed", reason="; ".join(problems))
        elif cannot:
            raise _Skip("; ".join(cannot))
        else:
            ratio_reasons = method.ratio_reasons() if hasattr(method, "ratio_reasons") else []
            if ratio_reasons:  # before the model loads: the method honours it on no model
                raise _Skip("; ".join(ratio_reasons))
            row.update(_run(cfg, method, samples, ctx, probe_cache=probe_cache))
    except _Skip as e:
        row.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a failed run still writes its row with the reason
        row.update(status="failed", reason=f"{type(e).__name__}: {e}")
        _log("failed:\n" + traceback.format_exc())
    try:
        row.update(R.environment(ctx["device"]))
    except Exception as e:  # noqa: BLE001
        _log(f"could not fingerprint the environment: {e}")
    row["finished_at"] = R.now()
    R.write_row(results_dir, row, samples=samples)
    if logger.get("name") == "wandb":
        _wandb(cfg.logger, config, row, samples, path)
    return row


def _identity(config: dict[str, Any], *, weights: bool = True) -> tuple[str, str | None]:
    """(run_id, model_revision) of a resolved config: the hash of the config with the weights' revision in it
    (retrained weights: new run ids). ``weights=False`` (a config with problems: its row is a failed one) leaves
    the revision out."""
    from . import loading
    from . import results as R

    model_cfg = config.get("model") if isinstance(config.get("model"), dict) else {}
    revision = loading.model_revision(model_cfg) if weights else None
    return R.run_id_of({**config, "model": {**model_cfg, "revision": revision}}), revision


def run_id_for(cfg: Any) -> str | None:
    """The run_id :func:`run_job` gives ``cfg`` when its settings are well-formed, or None when the config does not
    resolve (a grid asks which row a cell would write: ``harness.grid``'s resume rule for skipped cells)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
        return _identity(config)[0] if isinstance(config, dict) else None
    except (OmegaConfBaseException, KeyError, OSError):
        return None


def _wandb(logger_cfg: Any, config: dict, row: dict, samples: list[dict], path: Path) -> None:
    from .wandb_logger import log_run

    try:
        log_run(logger_cfg, config, row, samples)
    except Exception as e:  # noqa: BLE001 - the local row is the source of truth
        _log(f"W&B logging failed ({type(e).__name__}: {e}); the row is in {path}")


def _probe_key(cfg: Any, batch: int) -> str:
    """What the throughput probe depends on: the run's config without the task and the accuracy pass's knobs,
    and the probe's batch (``batch``: the run's batch_size unless bench.batch_size is set)."""
    from omegaconf import OmegaConf

    from .results import NON_IDENTITY_KEYS, canonical

    c = OmegaConf.to_container(cfg, resolve=True)
    return canonical({**{k: v for k, v in c.items() if k not in (*NON_IDENTITY_KEYS, "task", "limit", "batch_size",
                                                                "ppl_chunk")}, "probe_batch": batch})


def _run(cfg: Any, method: Any, samples: list[dict], ctx: dict[str, Any], *,
         probe_cache: dict | None = None) -> dict[str, Any]:
    from . import gpu_share
    from .devices import pin_error

    if pin_error():  # hydra/launcher=joblib_gpus could not give this job a GPU of its own: never run unpinned
        raise RuntimeError(f"no GPU for this job: {pin_error()}")
    out: dict[str, Any] = {}
    with gpu_share.shared():  # grid workers beside it on this GPU, but no probe (harness/gpu_share.py)
        ready = _evaluate(cfg, method, samples, ctx, out)
    if cfg.bench.enabled:
        with gpu_share.exclusive():  # the probe alone on the GPU among the workers
            _probe(cfg, ready, out, probe_cache)
    out["status"] = "ok"
    out["reason"] = out.get("reason")
    return out


def _evaluate(cfg: Any, method: Any, samples: list[dict], ctx: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Load, validate and calibrate, then the accuracy pass: its columns go into ``out``; returns what the probe
    needs (the engine, the loaded model, its spec and the resolved config)."""
    import torch
    from omegaconf import OmegaConf

    from methods.api import ModelSpec

    from . import settings as S
    from .loading import load
    from .measure import nominal_weights_bytes
    from .session import Unsupported, open_session

    t0 = time.perf_counter()
    _log(f"loading model {cfg.model.name}")
    loaded = load(OmegaConf.to_container(cfg.model, resolve=True), device=cfg.device.name,
                  split_over=OmegaConf.to_container(cfg.device, resolve=True).get("split_over"))
    model, tok = loaded.model, loaded.tokenizer
    ctx["device"] = loaded.device
    out["weights"] = loaded.weights
    spec = ModelSpec.from_config(model.config)
    config = OmegaConf.to_container(cfg, resolve=True)
    cannot = S.fit_problems(config, max_pos=spec.max_position_embeddings or None, source="the loaded config")
    if cannot:  # the check before loading could not read the model's config.json (a hub id not cached)
        raise _Skip("; ".join(cannot))
    try:  # validate -> calibrate (in the run's prefill_chunk) -> engine, as every evaluation does
        session = open_session(model=model, tokenizer=tok, method=method, device=loaded.device, dtype=loaded.dtype,
                               seed=int(cfg.seed), prefill_chunk=cfg.prefill_chunk)
    except Unsupported as e:
        raise _Skip(str(e)) from e
    engine = session.engine
    nominal = torch.empty((), dtype=getattr(torch, spec.nominal_dtype)).element_size()
    out["weights_bytes"] = nominal_weights_bytes(model, nominal)
    out["calibrate_ms"] = session.calibrate_ms
    _log(f"model ready in {time.perf_counter() - t0:.1f}s; evaluating {cfg.task.name} "
         f"({'all' if cfg.limit is None else cfg.limit} samples, {cfg.context_length} tokens)")

    out.update(_accuracy_pass(cfg, engine, tok, samples))
    out["kernel"] = engine.kernel  # the path that ran: fused kernels (CUDA) or the reference

    return {"engine": engine, "loaded": loaded, "model": model, "spec": spec, "config": config}


def _probe(cfg: Any, ready: dict[str, Any], out: dict[str, Any], probe_cache: dict | None) -> None:
    """The throughput probe's columns into ``out``: measured here, or copied from an earlier probe of the same
    model, method, ratio and shape (``probe_cache`` in this process; ``gpu_share.ProbeFile`` across workers)."""
    from . import gpu_share
    from .measure import throughput_probe
    from .session import probe_batch

    engine, loaded, model, spec, config = (ready[k] for k in ("engine", "loaded", "model", "spec", "config"))
    shared_probes = gpu_share.probe_file()
    batch, batch_from = probe_batch(config)  # the run's batch_size unless bench.batch_size is set
    out["probe_batch_from"] = batch_from
    key = None if probe_cache is None and shared_probes is None else _probe_key(cfg, batch)
    earlier = shared_probes.get(key) if shared_probes is not None and key is not None else None
    if key is not None and probe_cache is not None and key in probe_cache:
        _log("throughput probe: measured earlier in this process for the same model, method and ratio")
        probe = dict(probe_cache[key])
    elif earlier is not None:
        _log("throughput probe: measured earlier by another worker for the same model, method and ratio")
        probe = dict(earlier)
    else:
        _log(f"throughput probe: {batch} ({batch_from}) x {cfg.bench.context_length} random tokens, "
             f"{cfg.bench.decode_steps} decode steps (after a short warm-up)")
        tp = time.perf_counter()
        probe = throughput_probe(
            engine, batch_size=batch, context_length=int(cfg.bench.context_length),
            decode_steps=int(cfg.bench.decode_steps), vocab_size=spec.vocab_size, seed=int(cfg.seed),
        )
        _log(f"throughput probe done in {time.perf_counter() - tp:.1f}s")
        if key is not None and probe_cache is not None:
            probe_cache[key] = dict(probe)
        if key is not None and shared_probes is not None:
            shared_probes.put(key, probe)
    kv_read = probe.pop("probe_kv_bytes_read_per_step")
    out.update(probe)
    slow = []  # why this GPU row's decode speed is not the fast path's (an ok row still says so)
    if engine.graph_error:
        slow.append(f"decode ran without a CUDA graph: {engine.graph_error}")
    if loaded.device.type == "cuda" and engine.fused is None:
        slow.append(f"decode steps ran through the model's modules: {engine.fused_layers_reason}")
    if slow:
        out["reason"] = "; ".join([r for r in (out.get("reason"),) if r] + slow)
    if loaded.device.type == "cuda" and out.get("decode_ms_p50"):
        from .devices import roofline_ms

        roof = roofline_ms(model, kv_bytes=kv_read)  # over every GPU a split model spans (harness/devices.py)
        if roof:
            out["roofline_ms"] = roof["roofline_ms"]
            out["roofline_frac"] = roof["roofline_ms"] / out["decode_ms_p50"]


def _lean_lm_eval() -> None:
    """Two things lm-eval does on every ``simple_evaluate`` that a row does not need, off:

    - the bar it draws while it builds the requests (milliseconds, before the real work): the generate /
      loglikelihood bars are ours;
    - ``add_env_info``: torch's ``collect_env`` in subprocesses (``pip list``, ``nvidia-smi``, ...), about
      1.2 s a run on 2 CPU cores, repeated by each of a grid's hundreds of cells in one process. The row
      records its environment itself (``harness.results.environment``: torch, transformers, lm-eval,
      device, driver, git sha)."""
    import functools

    import lm_eval.api.task as task_mod
    import lm_eval.evaluator as evaluator_mod

    if not getattr(task_mod.tqdm, "_kvbench_quiet", False):
        quiet = functools.partial(task_mod.tqdm, disable=True)
        quiet._kvbench_quiet = True  # type: ignore[attr-defined]
        task_mod.tqdm = quiet
    if hasattr(evaluator_mod, "add_env_info"):
        evaluator_mod.add_env_info = lambda results: None


def _accuracy_pass(cfg: Any, engine: Any, tok: Any, samples: list[dict]) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tasks import TASK_DIR

    from .lm_eval_adapter import KVBenchLM, PromptSplitter

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _lean_lm_eval()
    task = cfg.task
    max_len = cfg.model.get("max_length") or getattr(engine.model.config, "max_position_embeddings", None)
    splitter = PromptSplitter(
        tokenizer=tok, context_field=task.get("context_field"), question_field=task.get("question_field"),
        split_pattern=task.get("split_pattern"), chat_template=bool(cfg.model.get("chat_template")),
        chat_template_kwargs=dict(cfg.model.get("chat_template_kwargs") or {}), max_length=max_len,
    )
    lm = KVBenchLM(engine=engine, tokenizer=tok, splitter=splitter, batch_size=int(cfg.batch_size),
                   protocol=str(cfg.protocol), ppl_chunk=int(cfg.ppl_chunk), progress=bool(cfg.progress))
    limit = None if cfg.limit is None else int(cfg.limit)
    metadata: dict[str, Any] = {"tokenizer": tok, "context_length": int(cfg.context_length), "seed": int(cfg.seed)}
    if limit is not None:
        metadata["n"] = limit
    if task.get("file"):
        metadata["ppl_file"] = str(task.file)
    if task.get("builtin"):
        metadata["max_seq_lengths"] = [int(cfg.context_length)]
        metadata["tokenizer"] = getattr(tok, "name_or_path", None)  # lm-eval's own tasks load it by name
        tm = TaskManager(metadata=metadata)
    else:
        tm = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata=metadata)
    name = str(task.lm_eval_task)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[name], limit=limit, task_manager=tm, log_samples=True, random_seed=int(cfg.seed),
        numpy_random_seed=int(cfg.seed), torch_random_seed=int(cfg.seed), fewshot_random_seed=int(cfg.seed),
        bootstrap_iters=0, verbosity="ERROR",
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    metric = task.get("metric")
    if metric is None and str(int(cfg.context_length)) in {k.split(",")[0] for k in results["results"].get(name, {})}:
        metric = str(int(cfg.context_length))  # RULER in lm-eval names its metrics by sequence length
    out = _task_metrics(results, name, metric)
    if "accuracy" not in out:
        raise RuntimeError(f"task {name} reported no metric {task.get('metric')!r}: {sorted(results['results'][name])}")
    recs = results.get("samples", {}).get(name, [])
    main = metric or "accuracy"
    per_sample = [float(r[main]) for r in recs if isinstance(r.get(main), (int, float))]
    if out.get("accuracy_stderr") is None and len(per_sample) > 1:  # standard error of the mean
        mean = sum(per_sample) / len(per_sample)
        var = sum((x - mean) ** 2 for x in per_sample) / (len(per_sample) - 1)
        out["accuracy_stderr"] = (var / len(per_sample)) ** 0.5
    out["n_samples"] = len(recs)
    out["task_version"] = str(results.get("versions", {}).get(name))
    samples.extend(sample_records(recs, main))
    out.update(lm.totals.columns())
    out["n_truncated"] = splitter.n_truncated
    reasons = []
    if splitter.n_truncated:
        reasons.append(f"{splitter.n_truncated} of {len(recs)} prompts were longer than the model's window of {max_len} "
                       f"tokens (prompt + generation) and were cut in the middle of their context")
    if cfg.protocol == "query_agnostic" and splitter.fallbacks:
        out["protocol"] = "query_aware"
        reasons.append(f"{splitter.fallbacks} prompts had no context field or split pattern (task.context_field, "
                       "task.split_pattern); they ran query_aware")
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def _plain(value: Any) -> Any:
    """A JSON-able copy of an lm-eval value (tuples become lists, other objects their str)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def sample_records(recs: list[dict], main: str) -> list[dict[str, Any]]:
    """Per-sample predictions kept beside the row: prompt id, expected answers, generated text, score.

    ``generated`` is the text the method produced (generation tasks); ``response`` is lm-eval's filtered
    response otherwise (log-likelihoods for perplexity and multiple choice)."""
    out = []
    for r in recs:
        doc = r.get("doc") if isinstance(r.get("doc"), dict) else {}
        resp = r.get("filtered_resps") or r.get("resps")
        pred = resp[0] if isinstance(resp, list) and resp else resp
        while isinstance(pred, list) and len(pred) == 1:
            pred = pred[0]
        rec: dict[str, Any] = {
            "doc_id": r.get("doc_id"),
            "prompt_id": doc.get("id", r.get("doc_id")),
            "expected": _plain(r.get("target")),
            "generated": pred if isinstance(pred, str) else None,
            "score": r.get(main) if isinstance(r.get(main), (int, float)) else _plain(r.get(main)),
        }
        if not isinstance(pred, str):
            rec["response"] = _plain(pred)
        out.append(rec)
    return out


# -- multirun bookkeeping and interruption ----------------------------------------------------------
def _record_job(row: dict[str, Any]) -> None:
    """Append this job's status to the multirun's job log (jobs may run in other processes)."""
    log = os.environ.get(JOB_LOG_ENV)
    if not log:
        return
    line = json.dumps({"run_id": row.get("run_id"), "status": row.get("status")}) + "\n"
    try:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        with os.fdopen(fd, "a") as f:
            f.write(line)
    except OSError as e:
        _log(f"could not record the job in {log}: {e}")


def read_job_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def tally(jobs: list[dict[str, Any]]) -> str:
    counts = {s: sum(j.get("status") == s for j in jobs) for s in ("ok", "skipped", "failed")}
    return f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def _new_job_log() -> str:
    """A job-log path the multirun's jobs can reach: under ./outputs (shared with SLURM jobs, like Hydra's
    own output directory), else the temp directory."""
    import tempfile

    for base in (Path("outputs") / ".jobs", Path(tempfile.gettempdir())):
        try:
            base.mkdir(parents=True, exist_ok=True)
            fd, p = tempfile.mkstemp(prefix="kvbench-jobs-", suffix=".jsonl", dir=base)
            os.close(fd)
            return str(Path(p).resolve())
        except OSError:
            continue
    return ""


def interruptible() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt once (the run stops at once, its row is not written);
    a second signal while stopping is ignored, so an interruption prints no second traceback."""

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt(signum)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


_STARTED = [False]  # whether Hydra reached our task function (else its exit 1 was a config error)


def _hydra_entry(*, multirun: bool) -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def app(cfg: Any) -> None:
        _STARTED[0] = True
        try:
            row = run_job(cfg, strict=not multirun)
        except UsageError as e:
            print(usage_message(e), file=sys.stderr, flush=True)
            sys.exit(2)
        except Exception as e:  # noqa: BLE001 - a multirun job must not stop the others
            if not multirun:
                raise
            _log("job crashed:\n" + traceback.format_exc())
            row = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        from . import results as R

        metric = cfg.task.get("metric") if cfg.get("task") is not None else None
        path = R.row_path(str(cfg.results_dir), row["run_id"]) if row.get("run_id") else None
        _log(summary_line(row, path, metric=metric))
        print(R.dumps(row), flush=True)
        if multirun:
            _record_job(row)
        elif row.get("status") == "failed":
            sys.exit(1)

    app()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:]
    try:
        check_overrides(argv)
    except UsageError as e:
        print(usage_message(e), file=sys.stderr)
        sys.exit(2)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    own_log = False
    if multirun and not os.environ.get(JOB_LOG_ENV):
        os.environ[JOB_LOG_ENV] = _new_job_log()
        own_log = True
    interruptible()
    try:
        _hydra_entry(multirun=multirun)
    except SystemExit as e:
        if e.code == 1 and not _STARTED[0]:  # Hydra could not compose the config: bad input
            sys.exit(2)
        raise
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        if not os.environ.get(SUPERVISED_ENV):
            done = read_job_log(os.environ[JOB_LOG_ENV]) if multirun else []
            what = f"{tally(done)} finished, their rows are kept" if multirun else "no row was written for this run"
            from .sweep import fresh_line

            print(f"{fresh_line()}interrupted: {what}; rerun the same command to resume (finished runs are skipped)",
                  file=sys.stderr, flush=True)
        sys.exit(128 + int(signum))
    finally:
        jobs = read_job_log(os.environ[JOB_LOG_ENV]) if multirun else []
        if own_log:
            Path(os.environ.pop(JOB_LOG_ENV)).unlink(missing_ok=True)
    if multirun:
        failed = sum(j.get("status") == "failed" for j in jobs)
        _log(f"multirun done: {tally(jobs)}" + (" (exit 1: see the failed rows' reasons)" if failed else ""))
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
