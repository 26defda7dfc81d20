"""``--profile N``: where a kvbench decode step's time goes (torch.profiler, kernel time per step by category)."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import torch

from scripts.bench.common import CudaTimer, chunk_for, pcts, random_ids
from scripts.bench.method_spec import MethodSpec

# Kernel-name patterns of the --profile breakdown, first match wins (lower-cased names; on CPU, aten op names)
PROFILE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"decode_split|decode_combine|prefill|flash|fmha|attn|sdpa"),
    ("gemm", r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("norm", r"norm|rsqrt"),
    ("kv write / copy", r"copy|index_put|index_copy|scatter|append|aten::cat"),
    ("elementwise / reduce", r"elementwise|vectorized|unrolled|reduce|silu|rope|aten::(mul|add|neg|pow|mean|silu|argmax)"),
)


class _ProfileMonitor:
    """Engine monitor that runs torch.profiler over decode steps ``skip .. skip + steps - 1``."""

    def __init__(self, skip: int, steps: int, device: torch.device):
        self.skip, self.steps, self.device, self.n, self.prof, self.running = skip, steps, device, 0, None, False
        self.step_ms: list[float] = []

    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0):
        yield

    @contextlib.contextmanager
    def decode_step(self):
        from torch.profiler import ProfilerActivity, profile

        if self.n == self.skip:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            self.running = True
        with CudaTimer(self.device) as t:
            yield
        if self.skip <= self.n < self.skip + self.steps:
            self.step_ms.append(t.ms)
        self.n += 1
        if self.n == self.skip + self.steps:
            self.finish()

    def finish(self) -> None:
        if self.running:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.prof.__exit__(None, None, None)
            self.running = False


def kernel_breakdown(prof: Any, steps: int, on_gpu: bool) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """(ms per step by category, top kernels as (name, ms per step, calls per step)) from a finished profile:
    device kernels on a GPU, self CPU time of aten ops on CPU."""
    import re

    from torch.autograd import DeviceType

    per: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if on_gpu:
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.self_device_time_total
        else:
            if not e.key.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us > 0:
            per[e.key] = [us / 1000 / steps, e.count / steps]
    cats: dict[str, float] = {}
    for name, (ms, _) in per.items():
        low = name.lower()
        cat = next((c for c, pat in PROFILE_CATEGORIES if re.search(pat, low)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    top = sorted(((n, v[0], v[1]) for n, v in per.items()), key=lambda x: -x[1])[:12]
    return cats, top


def profile_kvbench(model: Any, B: int, S: int, args: argparse.Namespace, spec: MethodSpec | None = None
                    ) -> dict[str, Any]:
    """Where a kvbench decode step's time goes (``full``, or the method of ``spec``): torch.profiler over
    ``args.profile`` steps (after 3), with the CUDA graph when it captures (kernels inside a graph replay are
    traced by CUPTI), else eagerly."""
    from harness.engine import Engine, Prompt
    from methods.full import Full

    dev = next(model.parameters()).device
    ids = random_ids(B, S, model.config.vocab_size, args.seed, torch.device("cpu"))
    for want_graph in (True, False):  # eagerly when the graph replay's kernels were not traced
        mon = _ProfileMonitor(skip=3, steps=args.profile, device=dev)
        method = Full() if spec is None else spec.build(model)[0]
        engine = Engine(model, method, prefill_chunk=chunk_for(B, args), monitor=mon, cuda_graph=want_graph)
        # the first new token comes from the prefill's logits: 3 + N decode steps need 4 + N new tokens
        engine.generate([Prompt(context=row.tolist()) for row in ids], max_new_tokens=4 + args.profile)
        mon.finish()
        if mon.prof is None or not mon.step_ms:
            raise RuntimeError(f"no decode step was profiled ({mon.n} steps ran)")
        cats, top = kernel_breakdown(mon.prof, len(mon.step_ms), dev.type == "cuda")
        graph = want_graph and engine.graph_error is None and dev.type == "cuda"
        if cats or not graph:
            break
    return {"kind": "profile", "batch": B, "context": S, "label": spec.label if spec else "full",
            "cuda_graph": graph, "steps": len(mon.step_ms),
            "step_ms_p50": pcts(mon.step_ms)[0], "busy_ms": sum(cats.values()), "categories": cats, "top": top}
