"""One evaluation session: validate -> calibrate -> engine, then the caller evaluates.

The runner (:mod:`harness.run`, whose evaluation is lm-eval's accuracy pass and the throughput probe)
and the scripts (:class:`harness.evaluate.Evaluator`, whose evaluation is per-sample greedy generation)
prepare a method on a loaded model the same way, here:

1. validate: the engine's and the method's reasons this model cannot run it (:class:`Unsupported`; the
   runner writes a skipped row, a script raises);
2. calibrate: :meth:`KVMethod.calibrate` with the run's seed, held-out samples
   (:func:`harness.calibration.calibration_samples`, ``make_samples``) and the engine (``run``), both
   prefilling in the run's ``prefill_chunk``, so a method fits on what it will see (RateQuant calibrates
   wherever it runs);
3. engine: :class:`harness.engine.Engine` with the run's ``prefill_chunk``.

:func:`probe_batch` says what batch the throughput probe uses: the run's ``batch_size`` unless
``bench.batch_size`` is set (the row's ``probe_batch_from`` says which).

Imports neither lm-eval nor Hydra (the scripts run on a GPU machine without them); torch only when a
session opens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Session", "Unsupported", "calibration_context", "open_session", "probe_batch"]


class Unsupported(Exception):
    """The method cannot run on this model (its reasons, joined); the run is skipped, not failed."""


@dataclass
class Session:
    """A method ready to evaluate on a loaded model."""

    model: Any
    tokenizer: Any
    method: Any
    spec: Any  # methods.api.ModelSpec
    engine: Any  # harness.engine.Engine
    calibrate_ms: float  # wall time of method.calibrate


def calibration_context(*, model: Any, tokenizer: Any, spec: Any, device: Any, dtype: Any, seed: int,
                        prefill_chunk: int | None, artifacts_dir: str | None = None) -> Any:
    """The :class:`methods.api.CalibrationContext` every evaluation gives ``method.calibrate``: no fixed
    samples; ``make_samples(n, length)`` draws held-out text (seeded by ``seed``); ``run`` prefills
    through the engine in chunks of ``prefill_chunk`` tokens."""
    from methods.api import CalibrationContext

    from .calibration import calibration_samples, engine_runner

    extra = {} if artifacts_dir is None else {"artifacts_dir": str(artifacts_dir)}
    return CalibrationContext(
        model=model, spec=spec, samples=[], device=device, dtype=dtype, seed=int(seed),
        prefill_chunk=prefill_chunk, run=engine_runner(model, prefill_chunk=prefill_chunk),
        make_samples=lambda n, length: calibration_samples(tokenizer, n=n, length=length, seed=int(seed)), **extra)


def open_session(*, model: Any, tokenizer: Any, method: Any, device: Any, dtype: Any, seed: int,
                 prefill_chunk: int | None, artifacts_dir: str | None = None) -> Session:
    """Validate ``method`` on ``model``, calibrate it, build its engine. Raises :class:`Unsupported`
    (before calibrating) when the engine or the method cannot run this model."""
    from methods.api import ModelSpec, engine_reasons

    from .engine import Engine, UnsupportedModel

    spec = ModelSpec.from_config(model.config)
    reasons = list(method.validate(spec)) or engine_reasons(spec)  # the method's first, as a row has always said
    if reasons:
        raise Unsupported("; ".join(reasons))
    t0 = time.perf_counter()
    method.calibrate(calibration_context(model=model, tokenizer=tokenizer, spec=spec, device=device, dtype=dtype,
                                         seed=seed, prefill_chunk=prefill_chunk, artifacts_dir=artifacts_dir))
    calibrate_ms = 1000 * (time.perf_counter() - t0)
    try:
        engine = Engine(model, method, prefill_chunk=prefill_chunk)
    except UnsupportedModel as e:
        raise Unsupported(str(e)) from e
    return Session(model=model, tokenizer=tokenizer, method=method, spec=spec, engine=engine,
                   calibrate_ms=calibrate_ms)


def probe_batch(config: dict[str, Any]) -> tuple[int, str]:
    """(batch, the setting it came from) of the throughput probe for a resolved run config:
    ``bench.batch_size`` when set, else the run's ``batch_size``."""
    bench = config.get("bench") if isinstance(config.get("bench"), dict) else {}
    if bench.get("batch_size") is not None:
        return int(bench["batch_size"]), "bench.batch_size"
    return int(config["batch_size"]), "batch_size"
