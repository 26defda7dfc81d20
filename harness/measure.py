"""Speed and memory measurement (docs/ARCHITECTURE.md §7).

- Timing: phases are bracketed by ``torch.cuda.synchronize()`` on GPU; decode steps are timed
  one by one (p50/p90 of the per-step list). A warm-up run precedes every measured one.
- Peak memory per phase: on GPU ``max_memory_allocated`` after ``reset_peak_memory_stats``; on
  CPU the process's resident-set high-water mark (VmHWM) after resetting it through
  ``/proc/self/clear_refs`` at the phase start, i.e. this run's own peak, not the lifetime
  ``ru_maxrss``. Where the reset is not permitted, a sampling thread measures the peak instead.
- The throughput probe runs after the accuracy pass on random tokens of a fixed shape
  (the run's ``batch_size``, or ``bench.batch_size`` when set, x ``bench.context_length``,
  ``bench.decode_steps`` greedy steps with no stop), so speed columns are comparable across tasks.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .engine import Engine, Monitor, Prompt


def _sync(device: torch.device | tuple) -> None:
    for d in _devices(device):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def _devices(device: torch.device | tuple) -> tuple[torch.device, ...]:
    """One device, or the devices of a model split over several (device=split): a tuple of them."""
    return tuple(torch.device(d) for d in device) if isinstance(device, (tuple, list)) else (torch.device(device),)


def _proc_status(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes, or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss_hwm() -> int | None:
    return _proc_status("VmHWM")


def _rss_now() -> int | None:
    return _proc_status("VmRSS")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory over a block: ``with PeakMemory(device) as p: ...; p.peak`` (bytes). For a tuple of GPUs (a
    model split over them) the sum of each GPU's own peak: what the run needed of each, added up."""

    def __init__(self, device: torch.device | tuple, sample_s: float = 0.005):
        self.gpus = tuple(d for d in _devices(device) if d.type == "cuda")
        self.device = self.gpus[0] if self.gpus else _devices(device)[0]
        self.peak: int | None = None
        self._sample_s = sample_s
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.gpus:
            for d in self.gpus:
                torch.cuda.synchronize(d)
                torch.cuda.reset_peak_memory_stats(d)
        elif not _reset_hwm():  # fall back to sampling RSS
            self._samples = [_rss_now() or 0]
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self._sample_s):
            self._samples.append(_rss_now() or 0)

    def __exit__(self, *exc: Any) -> None:
        if self.gpus:
            for d in self.gpus:
                torch.cuda.synchronize(d)
            self.peak = sum(int(torch.cuda.max_memory_allocated(d)) for d in self.gpus)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._samples + [_rss_now() or 0])
        else:
            self.peak = _rss_hwm()


@dataclass
class TimingMonitor(Monitor):
    """Records wall time and peak memory per engine phase and the time of every decode step."""

    device: torch.device | tuple  # a tuple: every device of a split model
    phase_s: dict[str, float] = field(default_factory=dict)
    phase_peak: dict[str, int | None] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, name: str, *, tokens: int = 0) -> Iterator[None]:
        with PeakMemory(self.device) as pm:
            _sync(self.device)
            t0 = time.perf_counter()
            yield
            _sync(self.device)
            self.phase_s[name] = self.phase_s.get(name, 0.0) + time.perf_counter() - t0
        self.phase_peak[name] = max(filter(None, [self.phase_peak.get(name), pm.peak]), default=None)

    @contextlib.contextmanager
    def decode_step(self) -> Iterator[None]:
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.step_s.append(time.perf_counter() - t0)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def graph_ms_per_call(fns: list, iters: int) -> float:
    """Device milliseconds per call of ``fns`` (each called once per replay, in turn) captured in a CUDA graph, as
    the engine's decode step runs kernels (no Python launch overhead): median over ``iters`` replays. Kernel
    micro-benchmarks (scripts/bench_attention.py, scripts/bench_gemv.py) time with it."""
    for f in fns:  # compile and warm up, then once more on a side stream (what capture needs)
        f()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float | None:
    """Device memory bandwidth in bytes/s measured by a large copy (read + write), GPU only."""
    if device.type != "cuda":
        return None
    n = nbytes // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        b.copy_(a)
    torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / repeats
    del a, b
    return 2 * nbytes / dt


def weights_bytes(model: Any) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def nominal_weights_bytes(model: Any, nominal_itemsize: int) -> int:
    """Weights at the model's nominal dtype (a CPU run holds fp32 copies of bf16 weights)."""
    return int(sum(p.numel() * (nominal_itemsize if p.is_floating_point() else p.element_size())
                   for p in model.parameters()))


def throughput_probe(
    engine: Engine,
    *,
    batch_size: int,
    context_length: int,
    decode_steps: int,
    vocab_size: int,
    seed: int = 0,
    warmup: bool = True,
) -> dict[str, Any]:
    """Prefill ``batch_size`` prompts of ``context_length`` random tokens, compress, then decode
    ``decode_steps`` greedy steps with no stop; returns the speed and peak-memory columns."""
    device = engine.device
    g = torch.Generator().manual_seed(seed)
    high = max(2, min(vocab_size, 32000))

    def prompts(n: int) -> list[Prompt]:
        return [Prompt(context=torch.randint(1, high, (n,), generator=g).tolist()) for _ in range(batch_size)]

    saved = engine.monitor
    try:
        if warmup:
            engine.monitor = Monitor()
            engine.generate(prompts(min(context_length, 64)), max_new_tokens=min(decode_steps, 4))
        devs = getattr(engine, "devices", [device])
        mon = TimingMonitor(tuple(devs) if len(devs) > 1 else device)
        engine.monitor = mon
        out = engine.generate(prompts(context_length), max_new_tokens=decode_steps)
    finally:
        engine.monitor = saved
    steps = mon.step_s
    prefill_s = mon.phase_s.get("prefill", float("nan"))
    compress_s = mon.phase_s.get("compress", 0.0)
    mean_step = statistics.fmean(steps) if steps else float("nan")
    res: dict[str, Any] = {
        "prefill_tok_s": batch_size * context_length / prefill_s if prefill_s > 0 else None,
        "ttft_ms": 1000 * (prefill_s + compress_s),
        "compress_ms": 1000 * compress_s,
        "decode_tok_s": batch_size / mean_step if steps else None,
        "decode_ms_p50": 1000 * percentile(steps, 0.5) if steps else None,
        "decode_ms_p90": 1000 * percentile(steps, 0.9) if steps else None,
        "peak_mem_prefill_bytes": max(filter(None, [mon.phase_peak.get("prefill"), mon.phase_peak.get("compress")]),
                                      default=None),
        "peak_mem_decode_bytes": mon.phase_peak.get("decode"),
        "probe_batch_size": batch_size,
        "probe_context_length": context_length,
        "probe_decode_steps": len(steps),
        "probe_kv_bytes_read_per_step": out.stats_final.bytes_read_per_step,
    }
    return res
