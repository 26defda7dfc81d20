"""``python -m harness.run``: one run = model x method x ratio x task -> one tidy row.

    python -m harness.run method=streaming_llm ratio=0.5 task=niah_single limit=4
    python -m harness.run -m method=uniform_int,streaming_llm ratio=0.5,0.75 task=niah_single,niah_multikey

Every run (ok, skipped or failed) writes one row to ``results/runs/<run_id>.json`` and prints it as
the last stdout line. A run whose ok row exists is skipped (``force=true`` reruns it).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
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
                "composed": "eviction"}


class UsageError(Exception):
    """Bad command-line input: exit 2 with a message that says what to do."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def check_overrides(argv: list[str]) -> None:
    """Refuse unknown group options and top-level keys before Hydra starts, with suggestions."""
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        root = key.split(".")[0].split("/")[0]
        if root == "hydra" or key.startswith("hydra/"):
            continue
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


def _log(msg: str) -> None:
    print(f"[kvbench] {msg}", file=sys.stderr, flush=True)


def _method_name(cfg: Any) -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices["method"])
    except Exception:  # noqa: BLE001 - outside a Hydra app (tests compose configs directly)
        target = str(cfg.method.get("_target_", "?"))
        return getattr(cfg.method, "name", None) or target.rsplit(".", 1)[-1].lower()


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


def run_job(cfg: Any, *, method_name: str | None = None) -> dict[str, Any]:
    """Run one configuration and return its row (written to results/runs/ before returning)."""
    from omegaconf import OmegaConf

    from . import loading
    from . import results as R

    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    revision = loading.model_revision(config["model"])  # retrained weights at the same path: new run ids
    run_id = R.run_id_of({**config, "model": {**config["model"], "revision": revision}})
    results_dir = Path(str(cfg.results_dir))  # relative to the working directory (hydra.job.chdir=false)
    path = R.row_path(results_dir, run_id)
    existing = R.read_row(path)
    if existing and existing.get("status") == "ok" and not cfg.force:
        _log(f"skipped: run {run_id} is already done ({path}); force=true reruns it")
        return existing

    method_name = method_name or _method_name(cfg)
    task_cfg = cfg.task
    row = R.new_row(
        run_id=run_id, model=cfg.model.name, model_revision=revision,
        weights=cfg.model.get("weights"), method=method_name, ratio=float(cfg.ratio), task=task_cfg.name,
        protocol=cfg.protocol, context_length=cfg.context_length, prefill_chunk=cfg.prefill_chunk,
        batch_size=cfg.batch_size, seed=cfg.seed, status="failed", started_at=R.now(),
        config=json.dumps(config, sort_keys=True, default=str),
    )
    samples: list[dict] = []
    device = None
    try:
        row.update(_run(cfg, row, samples))
        device = row.pop("_device", None)
    except _Skip as e:
        row.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001 - a failed run still writes its row with the reason
        row.update(status="failed", reason=f"{type(e).__name__}: {e}")
        _log("failed:\n" + traceback.format_exc())
    row.pop("_device", None)
    try:
        row.update(R.environment(device))
    except Exception as e:  # noqa: BLE001
        _log(f"could not fingerprint the environment: {e}")
    row["finished_at"] = R.now()
    R.write_row(results_dir, row)
    if str(cfg.logger.name) == "wandb":
        from .wandb_logger import log_run

        try:
            log_run(cfg.logger, config, row, samples)
        except Exception as e:  # noqa: BLE001 - the local row is the source of truth
            _log(f"W&B logging failed ({type(e).__name__}: {e}); the row is in {path}")
    return row


class _Skip(Exception):
    pass


def _run(cfg: Any, row: dict[str, Any], samples: list[dict]) -> dict[str, Any]:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from methods.api import CalibrationContext, ModelSpec

    from .engine import Engine, UnsupportedModel
    from .loading import load
    from .measure import nominal_weights_bytes, throughput_probe

    out: dict[str, Any] = {}
    from .devices import pin_error

    if pin_error():  # hydra/launcher=joblib_gpus could not give this job a GPU of its own: never run unpinned
        raise RuntimeError(f"no GPU for this job: {pin_error()}")
    if cfg.protocol not in ("query_agnostic", "query_aware"):
        raise ValueError(f"unknown protocol {cfg.protocol!r}; use query_agnostic or query_aware")
    try:
        method = instantiate(cfg.method, ratio=float(cfg.ratio), _convert_="all")
    except Exception as e:  # hyperparameter errors from __post_init__
        cause = e.__cause__ or e
        raise ValueError(f"bad parameters for method {row['method']}: {cause}") from e
    out.update(family=method.family, memory=method.memory, kernel=method.kernel,
               method_params=json.dumps(method.params(), sort_keys=True, default=str) if hasattr(method, "params") else None)
    row.update(out)

    t0 = time.perf_counter()
    _log(f"loading model {cfg.model.name}")
    loaded = load(OmegaConf.to_container(cfg.model, resolve=True), device=cfg.device.name,
                  split_over=OmegaConf.to_container(cfg.device, resolve=True).get("split_over"))
    model, tok = loaded.model, loaded.tokenizer
    out["_device"] = str(loaded.device)
    out["weights"] = loaded.weights
    spec = ModelSpec.from_config(model.config)
    reasons = method.validate(spec)
    if reasons:
        raise _Skip("; ".join(reasons))
    try:
        engine = Engine(model, method, prefill_chunk=cfg.prefill_chunk)
    except UnsupportedModel as e:
        raise _Skip(str(e)) from e
    nominal = torch.empty((), dtype=getattr(torch, spec.nominal_dtype)).element_size()
    out["weights_bytes"] = nominal_weights_bytes(model, nominal)

    tc = time.perf_counter()
    from .calibration import calibration_samples, engine_runner

    method.calibrate(CalibrationContext(
        model=model, spec=spec, samples=[], device=loaded.device, dtype=loaded.dtype, seed=int(cfg.seed),
        run=engine_runner(model),
        make_samples=lambda n, length: calibration_samples(tok, n=n, length=length, seed=int(cfg.seed))))
    out["calibrate_ms"] = 1000 * (time.perf_counter() - tc)
    _log(f"model ready in {time.perf_counter() - t0:.1f}s; evaluating {cfg.task.name} "
         f"({cfg.limit} samples, {cfg.context_length} tokens)")

    out.update(_accuracy_pass(cfg, engine, tok, samples))
    out["kernel"] = engine.kernel  # the path that ran: fused kernels (CUDA) or the reference

    if cfg.bench.enabled:
        _log("throughput probe")
        probe = throughput_probe(
            engine, batch_size=int(cfg.bench.batch_size), context_length=int(cfg.bench.context_length),
            decode_steps=int(cfg.bench.decode_steps), vocab_size=spec.vocab_size, seed=int(cfg.seed),
        )
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
    out["status"] = "ok"
    out["reason"] = out.get("reason")
    return out


def _accuracy_pass(cfg: Any, engine: Any, tok: Any, samples: list[dict]) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tasks import TASK_DIR

    from .lm_eval_adapter import KVBenchLM, PromptSplitter

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
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
    for r in recs:
        resp = r.get("filtered_resps") or r.get("resps")
        pred = resp[0] if isinstance(resp, list) and resp else resp
        while isinstance(pred, list) and pred:
            pred = pred[0]
        samples.append({"doc_id": r.get("doc_id"), "target": json.dumps(r.get("target"), default=str),
                        "prediction": str(pred), "score": r.get(main)})
    out.update(lm.totals.columns())
    out["n_truncated"] = splitter.n_truncated
    if cfg.protocol == "query_agnostic" and splitter.fallbacks:
        out["protocol"] = "query_aware"
        out["reason"] = (f"{splitter.fallbacks} prompts had no context field or split pattern (task.context_field, "
                         "task.split_pattern); they ran query_aware")
    return out


def _hydra_entry() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")
    def app(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        row = run_job(cfg)
        print(json.dumps(row, default=str), flush=True)
        if row.get("status") == "failed" and HydraConfig.get().mode == RunMode.RUN:
            sys.exit(1)

    app()


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_overrides(sys.argv[1:])
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _hydra_entry()


if __name__ == "__main__":
    main()
