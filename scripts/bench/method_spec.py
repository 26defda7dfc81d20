"""``--methods`` and ``--calibrate``: any conf/method name, built from its YAML without Hydra."""

from __future__ import annotations

import time
from typing import Any

import torch

from scripts.bench.common import REPO


class MethodSpec:
    """``name[:ratio[:key=value...]]`` (e.g. ``fp8:0.5``, ``ratequant:0.75:base=quarot``): the conf/method YAML's
    ``_target_`` class with its defaults, the ratio and the overrides (values parsed as YAML)."""

    def __init__(self, text: str):
        import yaml

        parts = text.split(":")
        self.label, self.name = text, parts[0]
        self.ratio = float(parts[1]) if len(parts) > 1 and parts[1] else None
        self.overrides = {}
        for kv in parts[2:]:
            if "=" not in kv:
                raise SystemExit(f"bad method spec {text!r}: write name:ratio:key=value")
            k, v = kv.split("=", 1)
            self.overrides[k] = yaml.safe_load(v)
        path = REPO / "conf" / "method" / f"{self.name}.yaml"
        if not path.exists():
            have = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
            raise SystemExit(f"unknown method {self.name!r}; available: {', '.join(have)}")
        self.cfg = yaml.safe_load(path.read_text()) or {}

    def build(self, model: Any) -> tuple[Any, float | None]:
        """(the method, calibrate ms or None): validated for ``model`` (ValueError with the reasons), calibrated
        when it fits something (RateQuant) on random token ids, uncached, timed."""
        import importlib
        import tempfile

        from methods.api import CalibrationContext, MethodBase, ModelSpec

        cfg = {k: v for k, v in self.cfg.items() if k != "_target_"}
        cfg.update(self.overrides)
        if self.ratio is not None:
            cfg["ratio"] = self.ratio
        if "cache" in cfg:
            cfg["cache"] = False  # time the fit, not a cached file
        mod, _, cls = self.cfg["_target_"].rpartition(".")
        method = getattr(importlib.import_module(mod), cls)(**cfg)
        spec = ModelSpec.from_config(model.config)
        reasons = method.validate(spec)
        if reasons:
            raise ValueError("; ".join(reasons))
        if type(method).calibrate is MethodBase.calibrate:  # fits nothing
            return method, None
        from harness.calibration import engine_runner

        dev = next(model.parameters()).device
        g = torch.Generator().manual_seed(1234)
        high = max(2, min(model.config.vocab_size, 32000))

        def make_samples(n: int, length: int) -> list[torch.Tensor]:
            return [torch.randint(1, high, (length,), generator=g) for _ in range(n)]

        with tempfile.TemporaryDirectory() as tmp:
            ctx = CalibrationContext(model=model, spec=spec, samples=[], device=dev, dtype=next(model.parameters()).dtype,
                                     artifacts_dir=tmp, run=engine_runner(model), make_samples=make_samples)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            method.calibrate(ctx)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            ms = 1000 * (time.perf_counter() - t0)
        return method, ms
