"""Mirror a run to Weights & Biases (``logger=wandb``): config = the resolved Hydra config,
summary = the row, plus a Table of per-sample predictions (the records of
``results/samples/<run_id>.jsonl.gz``). Offline unless ``WANDB_MODE`` (or ``logger.mode``) says otherwise;
sync later with ``.venv/bin/wandb sync <dir>``. The JSON row in ``results/runs/`` stays the source of truth.
A run whose row exists is skipped and sends nothing, unless ``logger.resync=true`` (send the existing row
and its samples) or ``force=true`` (rerun it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Flat config keys a W&B workspace groups, filters and colours by (the resolved config nests model, method and
# task as dicts without their names): the same Pareto plots as `make report`, e.g. a scatter of summary
# ratio_achieved (x) against accuracy (y), grouped by method_name, filtered on model_name, task_name, context_length.
GROUPING_KEYS = ("model_name", "task_name", "method_name", "family", "ratio", "context_length", "protocol")


def grouping_keys(row: dict[str, Any]) -> dict[str, Any]:
    return {"model_name": row.get("model"), "task_name": row.get("task"), "method_name": row.get("method"),
            "family": row.get("family"), "ratio": row.get("ratio"), "context_length": row.get("context_length"),
            "protocol": row.get("protocol")}


def log_run(logger_cfg: Any, config: dict[str, Any], row: dict[str, Any], samples: list[dict]) -> str | None:
    """Log one run; returns the local run directory (or None when W&B is disabled)."""
    import wandb

    mode = str(logger_cfg.get("mode") or os.environ.get("WANDB_MODE") or "offline")
    if mode == "disabled":
        return None
    directory = Path(str(logger_cfg.get("dir") or "results/wandb"))
    directory.mkdir(parents=True, exist_ok=True)
    name = f"{row.get('model')}/{row.get('method')}@{row.get('ratio')}/{row.get('task')}"
    run = wandb.init(
        project=str(logger_cfg.get("project") or "kvbench"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group"),
        tags=list(logger_cfg.get("tags") or []) + [str(row.get("status"))],
        name=name,
        id=None,
        mode=mode,
        dir=str(directory),
        config={**{k: v for k, v in config.items() if k != "logger"}, **grouping_keys(row)},
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    try:
        summary = {k: v for k, v in row.items() if k != "config" and (v is None or isinstance(v, (int, float, str, bool)))}
        run.summary.update(summary)
        if samples:
            cols = sorted({k for s in samples for k in s})

            def cell(v: Any) -> Any:  # expected answers (lists), log-likelihoods: one JSON string per cell
                return json.dumps(v) if isinstance(v, (list, dict)) else v

            table = wandb.Table(columns=cols, data=[[cell(s.get(c)) for c in cols] for s in samples])
            run.log({"predictions": table})
        return str(Path(run.dir).parent)
    finally:
        run.finish()
