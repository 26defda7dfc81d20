"""Beyond one GPU, on existing engines (issue 24): no scheduler and no parallel runtime of our own.

1. **Many jobs, one GPU each.** ``hydra/launcher=joblib_gpus`` (``conf/hydra/launcher/joblib_gpus.yaml``) is
   Hydra's joblib launcher plus :class:`PinGpu`, a Hydra callback. joblib's loky backend runs the jobs in
   ``n_jobs`` worker processes and *reuses* each worker for many jobs, and CUDA reads
   ``CUDA_VISIBLE_DEVICES`` once per process, when it initialises. So the pin is per worker, not per job
   number: at its first job a worker claims a free GPU of the pool with an exclusive ``flock`` on
   ``<lock_dir>/gpu-<id>.lock`` (held until the process exits; the OS drops it when a worker dies, so a
   replacement worker claims it again) and sets ``CUDA_VISIBLE_DEVICES`` before torch touches CUDA; every
   later job in that worker checks it still holds that GPU. Two jobs therefore never share a GPU, whichever
   worker joblib hands a job to (a job-number rule, ``num % N``, would pair two running jobs on one GPU as
   soon as jobs finish out of order, and could not re-pin a reused worker anyway). ``n_jobs`` defaults to the
   pool's size; more workers than GPUs are cut to one per GPU. The locks live per host and user, so a second
   sweep on the same host takes only the GPUs the first left free; a job that finds none fails with its row
   (never runs unpinned). Each job computes exactly what it computes alone: the rows are a serial run's rows.
   Tensor parallelism, and why the layer split is the path built here: ``docs/multi_gpu.md``.

2. **One model over several GPUs.** ``device=split`` loads the model with its decoder layers split into
   contiguous groups over the GPUs (:func:`split_map`, handed to accelerate as a ``device_map``; accelerate's
   hooks move each block's inputs to its device). The engine puts each layer's KV store on its layer's
   device (:func:`layer_devices`). Decode steps: the fused step (``harness/fused_decoder.py``) runs each
   layer's kernels on that layer's GPU and moves the residual stream (B x hidden) when the next layer sits
   on another GPU; the CUDA graph is off (a graph captures one device's stream), and the row's reason says
   so. A layer split is a pipeline with one micro-batch: the GPUs take turns, so it buys memory, not speed;
   its roofline is the sum over GPUs of (bytes on that GPU / its bandwidth) (:func:`roofline_ms`), and the
   bound tensor parallelism could reach (all GPUs streaming their shard at once) is reported beside it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# 1. one job per GPU

_HELD: dict[str, Any] = {}  # this process's claim: {"gpu": id, "file": the open, flock'ed lock file}


def gpu_pool(gpus: Any = "auto") -> list[str]:
    """The GPUs jobs may be pinned to, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs).

    ``auto``: the launching shell's ``CUDA_VISIBLE_DEVICES`` when set, else every GPU torch sees (counted
    through NVML where available, which does not initialise CUDA in this process); an int k: GPUs 0..k-1;
    a list: those ids."""
    if gpus is None or gpus == "auto":
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None and env.strip():
            return [g.strip() for g in env.split(",") if g.strip()]
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        return [str(i) for i in range(gpus)]
    if isinstance(gpus, str):
        return [g.strip() for g in gpus.split(",") if g.strip()]
    return [str(g) for g in gpus]


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"kvbench-gpu-locks-{os.getuid()}"


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def pin_process(pool: list[str], *, lock_dir: str | os.PathLike | None = None) -> str:
    """Pin this process to one GPU of ``pool`` (``CUDA_VISIBLE_DEVICES``), claimed with an exclusive lock
    that the process holds until it exits; a process that already holds one keeps it. Returns the GPU id."""
    if not pool:
        raise ValueError("the GPU pool is empty: no GPU is visible here. Name the GPUs with "
                         "hydra.callbacks.pin_gpu.gpus=[0,1,...], or use the plain joblib launcher on a CPU machine")
    held = _HELD.get("gpu")
    if held is not None:
        if held not in pool:
            raise RuntimeError(f"this worker holds GPU {held}, which is not in the pool {pool}")
        if os.environ.get("CUDA_VISIBLE_DEVICES") != held:
            raise RuntimeError(f"this worker holds GPU {held} but CUDA_VISIBLE_DEVICES is now "
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}: something else changed it")
        return held
    if _cuda_initialised():
        raise RuntimeError("CUDA was initialised in this process before its GPU was pinned, so CUDA_VISIBLE_DEVICES "
                           "can no longer take effect; pin before anything touches torch.cuda")
    d = Path(lock_dir) if lock_dir else default_lock_dir()
    d.mkdir(parents=True, exist_ok=True)
    holders = []
    for gpu in pool:
        f = open(d / f"gpu-{gpu.replace('/', '_')}.lock", "a+")  # noqa: SIM115 - held open for the process's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holders.append(f"{gpu}: {f.read().strip() or '?'}")
            f.close()
            continue
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        _HELD.update(gpu=gpu, file=f)
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        return gpu
    raise RuntimeError(f"every GPU of the pool {pool} is held by another kvbench worker ({'; '.join(holders)}; "
                       f"locks in {d}). Wait for that sweep, or give this one other GPUs with "
                       "hydra.callbacks.pin_gpu.gpus=[...]")


class PinGpu:
    """Hydra callback of ``hydra/launcher=joblib_gpus``: one GPU per joblib worker (see the module docstring).

    ``gpus``: ``auto`` | k | [ids] (:func:`gpu_pool`); ``lock_dir``: where the per-GPU locks live
    (None: ``$TMPDIR/kvbench-gpu-locks-<uid>``, shared by every sweep of this user on this host).

    Hydra turns an exception in a callback into a warning and runs the job anyway, so a job whose worker
    could not be pinned must not run unpinned: the error is kept (:func:`pin_error`) and the runner writes
    the job's row as failed with it. Plain methods, no Hydra base class: the module stays importable where
    Hydra is not installed (the GPU scripts)."""

    def __init__(self, *, gpus: Any = "auto", lock_dir: str | None = None):
        self.gpus = gpus
        self.lock_dir = lock_dir
        self.pool: list[str] | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """In the launching process, before the launcher exists: fix the pool (workers inherit it, not the
        environment they will change) and size joblib's worker count to it (``n_jobs: 0`` = one per GPU; more
        workers than GPUs are cut to one per GPU)."""
        from omegaconf import open_dict, read_write

        self.pool = gpu_pool(self.gpus)
        launcher = config.hydra.launcher
        n = launcher.get("n_jobs")
        want = len(self.pool)
        if n not in (None, 0) and 0 < int(n) <= want:
            return
        if n not in (None, 0):
            print(f"[kvbench] hydra.launcher.n_jobs={n} with {want} GPUs {self.pool}: each worker takes a GPU of its "
                  f"own, so {want} workers run", file=sys.stderr, flush=True)
        with read_write(config.hydra), open_dict(launcher):
            launcher.n_jobs = max(1, want)  # an empty pool: one worker, whose jobs fail with the reason

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        try:
            pool = self.pool if self.pool is not None else gpu_pool(self.gpus)
            gpu = pin_process(pool, lock_dir=self.lock_dir)
        except Exception as e:  # noqa: BLE001 - kept for the runner: the job fails with its row, never runs unpinned
            _HELD["error"] = f"{type(e).__name__}: {e}"
            return
        _HELD["error"] = None
        num = config.hydra.job.get("num") if "hydra" in config else None
        print(f"[kvbench] job {num} runs on GPU {gpu} (CUDA_VISIBLE_DEVICES={gpu}, worker pid {os.getpid()})",
              file=sys.stderr, flush=True)

    def on_job_end(self, config: Any, **kwargs: Any) -> None:
        pass

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        pass

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        pass

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        pass


def pin_error() -> str | None:
    """Why this process's job could not be pinned to a GPU (None: pinned, or no pinning asked for)."""
    return _HELD.get("error")


# --------------------------------------------------------------------------------------------------
# 2. one model over several devices


def split_devices(split_over: Any, device: Any) -> list[str]:
    """``device.split_over`` -> the devices a model's layers are split over, in order.

    ``all``: every visible GPU; an int k: the first k; a list names them (``[cuda:0, cuda:1]``; CPU tests use
    ``[cpu, cpu]``, the split logic and accelerate's hooks with both halves on the CPU). Layers are never
    offloaded to CPU memory next to GPUs (a row would measure PCIe, not the method)."""
    import torch

    kind = torch.device(device or "cuda").type
    if split_over in (None, "all") or (isinstance(split_over, int) and not isinstance(split_over, bool)):
        if kind != "cuda":
            raise ValueError(f"device.split_over={split_over!r} counts GPUs, but the device is {device!r}; "
                             "name the devices instead, e.g. device.split_over=[cpu,cpu]")
        n = torch.cuda.device_count()
        k = n if split_over in (None, "all") else int(split_over)
        if n < 1 or not 1 <= k <= n:
            raise ValueError(f"device.split_over={split_over!r} but torch sees {n} GPU(s)")
        return [f"cuda:{i}" for i in range(k)]
    devs = [str(torch.device(d)) for d in (split_over.split(",") if isinstance(split_over, str) else split_over)]
    if not devs:
        raise ValueError("device.split_over is an empty list; name at least one device")
    kinds = {torch.device(d).type for d in devs}
    if len(kinds) > 1:
        raise ValueError(f"device.split_over={devs} mixes device types; kvbench splits layers over GPUs only "
                         "(no offload to CPU memory)")
    if kinds == {"cuda"}:
        n = torch.cuda.device_count()
        bad = [d for d in devs if (torch.device(d).index or 0) >= n]
        if bad:
            raise ValueError(f"device.split_over names {bad}, but torch sees {n} GPU(s)")
    return devs


def _decoder_path(model: Any) -> str:
    dec = model.get_decoder()
    for name, mod in model.named_modules():
        if mod is dec:
            return name
    raise ValueError(f"{type(model).__name__}: its decoder is not one of its modules")


def _nbytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def split_map(model: Any, devices: list[str], *, reserve_per_layer: int = 0) -> dict[str, str]:
    """An accelerate ``device_map`` splitting ``model``'s decoder layers into contiguous groups over ``devices``.

    The input embedding (and the rotary module) go with the first group, the final norm and the LM head with
    the last (with the first when the head is tied to the embedding: accelerate keeps tied weights on one
    device). Group sizes minimise the most loaded device, counting each layer's weights plus
    ``reserve_per_layer`` bytes (its KV capacity) and the embedding and head where they sit. Works on a meta
    model (shapes only)."""
    if not devices:
        raise ValueError("split_map needs at least one device")
    dec_path = _decoder_path(model)
    dec = model.get_decoder()
    layers = list(dec.layers)
    emb_w = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb_w
    first, last = devices[0], devices[-1]
    fixed: dict[str, str] = {}
    prefix = (dec_path + ".") if dec_path else ""
    for name, child in dec.named_children():
        if name == "layers":
            continue
        fixed[prefix + name] = last if child is getattr(dec, "norm", None) else first
    parts = dec_path.split(".") if dec_path else []  # siblings of the decoder and of its ancestors (the LM head)
    for depth in range(len(parts)):
        parent = model.get_submodule(".".join(parts[:depth]))
        for name, child in parent.named_children():
            if name == parts[depth]:
                continue
            full = ".".join(parts[:depth] + [name])
            fixed[full] = first if (child is head and tied) or child is not head else last
    cost = [_nbytes(layer) + int(reserve_per_layer) for layer in layers]
    extra = [0] * len(devices)
    for name, dev in fixed.items():
        extra[len(devices) - 1 if dev == last and dev != first else 0] += _nbytes(model.get_submodule(name))
    bounds = _partition(cost, extra)
    dm = dict(fixed)
    for d, (a, b) in enumerate(bounds):
        for i in range(a, b):
            dm[f"{prefix}layers.{i}"] = devices[d]
    return dm


def _partition(cost: list[int], extra: list[int]) -> list[tuple[int, int]]:
    """Contiguous split of ``cost`` into len(extra) groups (group d also carries extra[d]) minimising the
    largest group; every group gets at least one item when there are enough."""
    n, k = len(cost), len(extra)
    pre = [0]
    for c in cost:
        pre.append(pre[-1] + c)
    inf = float("inf")
    # best[d][i]: the smallest max load splitting items [0, i) over devices [0, d]
    best = [[inf] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k)]
    for i in range(n + 1):
        best[0][i] = pre[i] + extra[0]
    for d in range(1, k):
        for i in range(n + 1):
            for j in range(i + 1):
                if n >= k and (j < d or j == i):  # non-empty groups when possible
                    continue
                v = max(best[d - 1][j], pre[i] - pre[j] + extra[d])
                if v < best[d][i]:
                    best[d][i], cut[d][i] = v, j
    bounds, i = [], n
    for d in range(k - 1, 0, -1):
        j = cut[d][i]
        bounds.append((j, i))
        i = j
    bounds.append((0, i))
    return bounds[::-1]


def build_random_split(config: Any, device_map: dict[str, str], *, dtype: Any, seed: int) -> Any:
    """A random-weight model built straight onto the devices of ``device_map``: on the meta device first,
    then each block allocated on its device and initialised there by the model's own ``_init_weights``
    (rotary tables recomputed, tied weights re-tied). Deterministic by seed for a given split; a different
    draw than the one-device build (both rows say ``weights=random``: their accuracy means nothing)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    for name, dev in device_map.items():
        model.get_submodule(name).to_empty(device=dev)
    torch.manual_seed(int(seed))
    model.init_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"the device map left {left[:4]} on the meta device")
    return model


def dispatch(model: Any, device_map: dict[str, str]) -> Any:
    """Attach accelerate's hooks (each block's inputs move to its device) unless loading already did; with
    one distinct device (CPU tests) the hooks are forced, so the same code path runs."""
    if all(hasattr(model.get_submodule(n), "_hf_hook") for n in device_map if n):
        model.hf_device_map = dict(device_map)
        return model
    import logging

    from accelerate import dispatch_model

    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)  # "offloaded to the cpu" is wrong for an all-CPU map: nothing is offloaded
    try:
        # main_device = the first block's device: nothing in the map is treated as offloaded
        first = device_map[next(n for n in device_map if n.endswith("embed_tokens"))] if any(
            n.endswith("embed_tokens") for n in device_map) else next(iter(device_map.values()))
        dispatch_model(model, device_map=dict(device_map), main_device=first, force_hooks=True)
    finally:
        log.setLevel(level)
    return model


def layer_devices(decoder: Any) -> list[Any]:
    """The device of each decoder layer (where its weights, and so its KV store, live)."""
    out = []
    for layer in decoder.layers:
        p = next(layer.parameters(), None)
        if p is None:
            raise ValueError("a decoder layer without parameters: kvbench cannot tell its device")
        out.append(p.device)
    return out


def model_devices(model: Any) -> list[Any]:
    """The distinct devices holding ``model``'s weights, in first-use order."""
    seen: list[Any] = []
    for p in model.parameters():
        if p.device not in seen:
            seen.append(p.device)
    return seen


def graph_blocker(devices: list[Any]) -> str | None:
    """Why the decode step cannot be one CUDA graph here (None: it can)."""
    if len(devices) > 1:
        names = ", ".join(str(d) for d in devices)
        return (f"the model spans {len(devices)} devices ({names}); a CUDA graph captures one device's stream, "
                "so decode runs eagerly, each layer on its own GPU")
    return None


def bytes_per_device(model: Any, *, skip_input_embedding: bool = False) -> dict[Any, int]:
    """Weight bytes per device, each tensor once; ``skip_input_embedding`` leaves out the input embedding table
    unless the LM head shares it (a decode step reads only B rows of it)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    skip = {id(emb)} if skip_input_embedding and not (head is not None and head.weight is emb) else set()
    seen, out = set(), {}
    for p in model.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        out[p.device] = out.get(p.device, 0) + p.numel() * p.element_size()
    return out


def device_bandwidths(model: Any, *, nbytes: int = 1 << 30) -> dict[str, float]:
    """Copy bandwidth (bytes/s, :func:`harness.measure.copy_bandwidth`) of every GPU holding ``model``."""
    import torch

    from .measure import copy_bandwidth

    out = {}
    for d in model_devices(model):
        if d.type == "cuda":
            with torch.cuda.device(d):
                out[str(d)] = copy_bandwidth(d, nbytes=nbytes)
    return out


def roofline_ms(model: Any, *, kv_bytes: int, skip_input_embedding: bool = False,
                bandwidths: dict | None = None) -> dict[str, Any] | None:
    """Decode-step rooflines over the GPUs holding ``model`` (None off CUDA).

    ``roofline_ms``: the sum over devices of (weights on it + its share of the ``kv_bytes`` read per step,
    shared by layer count) / its copy bandwidth. Layers split over GPUs run one GPU after the other, so this
    is what a layer split can reach; on one GPU it is (weights + KV) / bandwidth. ``tp_roofline_ms``: all
    bytes over the summed bandwidth, the bound of tensor parallelism (every GPU streaming its shard at once).
    ``bandwidths`` (device -> bytes/s) are measured here where not given."""
    import torch

    w = bytes_per_device(model, skip_input_embedding=skip_input_embedding)
    if not w or any(d.type != "cuda" for d in w):
        return None
    per_layer = layer_devices(model.get_decoder())
    kv = {d: kv_bytes * sum(1 for x in per_layer if x == d) / len(per_layer) for d in w}
    bw = {torch.device(k): v for k, v in (bandwidths or {}).items()}
    missing = [d for d in w if d not in bw]
    if missing:
        from .measure import copy_bandwidth

        for d in missing:
            with torch.cuda.device(d):
                bw[d] = copy_bandwidth(d)
    if not all(bw[d] for d in w):
        return None
    total_bw = sum(bw[d] for d in w)
    return {"roofline_ms": 1000 * sum((w[d] + kv[d]) / bw[d] for d in w),
            "tp_roofline_ms": 1000 * (sum(w.values()) + kv_bytes) / total_bw, "n_devices": len(w)}
