"""Load a model and its tokenizer: a local directory, a Hugging Face id (from the local cache, at a
pinned revision), or a config with random weights (speed and memory at full scale).

Loaded models are cached per process, so a Hydra multirun loads each model once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    weights: str  # "trained" | "random"
    revision: str | None


_CACHE: dict[tuple, Loaded] = {}


def resolve_device(name: str | None) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but torch sees no GPU; use device=cpu or device=auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device, config: Any = None) -> torch.dtype:
    """auto: float32 on CPU (bf16 matmuls are ~3x slower there), else the model's dtype (bf16)."""
    if name in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        dt = getattr(config, "dtype", None) if config is not None else None
        if isinstance(dt, str):
            dt = getattr(torch, dt, None)
        return dt if isinstance(dt, torch.dtype) and dt != torch.float32 else torch.bfloat16
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    return dt


def _local(path: str) -> str:
    """A repo-relative path (models/...) resolved against the repo; anything else as given."""
    p = Path(path)
    if not p.is_absolute() and (REPO / p).exists():
        return str(REPO / p)
    return path


_FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def model_revision(model_cfg: dict[str, Any]) -> str | None:
    """What identifies the weights a run used: ``model.revision`` when set, else for a local directory
    ``local:<hash>`` of its config, tokenizer and weight files (a changed checkpoint under the same path
    gets new run ids instead of being skipped as done), else None (a hub id without a revision).

    Files up to 64 MiB are hashed whole; larger weight files by name, size and 16 spread 64 KiB samples,
    so an 8B checkpoint costs milliseconds, not a full read.
    """
    if model_cfg.get("revision"):
        return str(model_cfg["revision"])
    if model_cfg.get("gguf"):  # a GGUF from a registry package (harness/pretrained.py): the file is the identity
        from .pretrained import MissingGGUF, gguf_revision

        try:
            return gguf_revision(model_cfg["gguf"])
        except MissingGGUF:
            return None  # load() fails with the install command
    dirs = {_local(str(model_cfg["path"])), _local(str(model_cfg.get("tokenizer") or model_cfg["path"]))}
    if not all(Path(d).is_dir() for d in dirs):
        return None
    files = [p for d in sorted(dirs) for p in sorted(Path(d).iterdir()) if p.is_file() and (
        p.name in _FINGERPRINT_FILES or p.suffix in (".safetensors", ".bin", ".model"))]
    stats = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stats not in _REVISIONS:  # a sweep runs many jobs on one model: hash its files once per process
        _REVISIONS[stats] = _hash_files(files)
    return _REVISIONS[stats]


_REVISIONS: dict[tuple, str] = {}


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= 64 * 2**20:
                h.update(fh.read())
                continue
            for i in range(16):
                fh.seek((size - 2**16) * i // 15)
                h.update(fh.read(2**16))
    return "local:" + h.hexdigest()[:12]


def _not_found(path: str, revision: str | None, err: Exception) -> ValueError:
    rev = f" --revision {revision}" if revision else ""
    return ValueError(
        f"model {path!r} is not available locally ({type(err).__name__}: {err}). Download it once with "
        f"`huggingface-cli download {path}{rev}`, or point model.path at a local directory that holds "
        "config.json, the weights and the tokenizer."
    )


def load(model_cfg: dict[str, Any], *, device: str | None = "auto", split_over: Any = None) -> Loaded:
    """Load (or fetch from the per-process cache) the model described by a ``conf/model`` entry.

    ``split_over`` (``device=split``: ``all``, a GPU count or a list of devices) splits the decoder layers over
    several devices with an accelerate ``device_map`` (:func:`harness.devices.split_map`); ``Loaded.device`` is
    then the first one, where the inputs and the embedding live."""
    from transformers import AutoModelForCausalLM

    if split_over is not None:
        return _load_split(model_cfg, device=device, split_over=split_over)
    dev = resolve_device(device)
    src = _source(model_cfg)
    path, revision, random_init, offline = src.path, src.revision, src.random_init, src.offline
    key = (*src.key, str(dev))
    if key in _CACHE:
        return _CACHE[key]
    config, tokenizer = _config_and_tokenizer(src)
    dtype = resolve_dtype(model_cfg.get("dtype"), dev, config)
    if random_init:
        torch.manual_seed(int(model_cfg.get("random_seed") or 0))
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        weights = "random"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=revision, config=config, dtype=dtype, attn_implementation="sdpa", **offline
            ).to(dev)
        except OSError as e:
            raise _not_found(path, revision, e) from e
        weights = str(model_cfg.get("weights") or "trained")
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = Loaded(model=model, tokenizer=tokenizer, device=dev, dtype=dtype, weights=weights, revision=revision)
    _CACHE[key] = loaded
    return loaded


@dataclass(frozen=True)
class _Source:
    """Where a model config's weights and tokenizer come from (both loaders read it the same way)."""

    path: str
    revision: str | None
    random_init: bool
    tok_path: str
    offline: dict
    key: tuple  # the cache key without the device(s)
    rope: dict | None = None  # model.rope: RoPE scaling applied to the config (:func:`apply_rope`)


def _source(model_cfg: dict[str, Any]) -> _Source:
    if model_cfg.get("gguf"):  # converted once from the GGUF a registry package ships (harness/pretrained.py)
        from .pretrained import ensure_converted

        model_cfg = {**model_cfg, "path": str(ensure_converted(str(model_cfg["name"]), model_cfg["gguf"]))}
    path = _local(str(model_cfg["path"]))
    revision = model_cfg.get("revision")
    random_init = bool(model_cfg.get("random_init", False))
    tok_path = _local(str(model_cfg.get("tokenizer") or model_cfg["path"]))
    offline = {"local_files_only": True} if os.environ.get("HF_HUB_OFFLINE", "1") != "0" else {}
    rope = model_cfg.get("rope") or None
    key = (path, revision, random_init, model_cfg.get("random_seed"), model_cfg.get("dtype"), tok_path,
           json.dumps(rope, sort_keys=True))
    return _Source(path, revision, random_init, tok_path, offline, key, rope)


def tokenizer_path(model_cfg: dict[str, Any]) -> str:
    """The local directory (or hub id) :func:`load` reads a model config's tokenizer from, without loading the
    model: a GGUF model's is its converted checkpoint (converted here the first time). Scripts that tokenize in
    worker processes before the model loads (scripts/train/lkv.py) ask this."""
    return _source(model_cfg).tok_path


def apply_rope(config: Any, rope: dict | None) -> Any:
    """``model.rope`` (e.g. ``{rope_type: linear, factor: 4}``) merged into the config's ``rope_parameters`` (its
    ``rope_theta`` kept), and ``max_position_embeddings`` stretched by the factor, so the model's rotary module
    (which the fused decoder calls too) and the runner's window checks both see it. Position interpolation on a
    model never trained with it: whether it still retrieves is the experiment's to measure (the full-cache row)."""
    if not rope:
        return config
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({k: v for k, v in rope.items()})
    config.rope_parameters = params
    factor = float(rope.get("factor", 1.0))
    config.max_position_embeddings = int(config.max_position_embeddings * factor)
    return config


def _config_and_tokenizer(src: _Source) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = apply_rope(AutoConfig.from_pretrained(src.path, revision=src.revision, **src.offline), src.rope)
        tokenizer = AutoTokenizer.from_pretrained(
            src.tok_path, revision=None if src.tok_path != src.path else src.revision, **src.offline)
    except (OSError, ValueError) as e:
        raise _not_found(src.path, src.revision, e) from e
    return config, tokenizer


def _load_split(model_cfg: dict[str, Any], *, device: str | None, split_over: Any) -> Loaded:
    """:func:`load` with the layers split over ``split_over`` (harness/devices.py): trained weights stream
    from the checkpoint straight onto each layer's device (``from_pretrained(device_map=...)``); random
    weights are built on the meta device and initialised block by block on their devices."""
    from transformers import AutoModelForCausalLM

    from .devices import build_random_split, dispatch, split_devices, split_map

    devices = split_devices(split_over, device if device not in (None, "auto") else "cuda")
    dev = torch.device(devices[0])
    src = _source(model_cfg)
    path, revision, random_init, offline = src.path, src.revision, src.random_init, src.offline
    key = (*src.key, tuple(devices))
    if key in _CACHE:
        return _CACHE[key]
    config, tokenizer = _config_and_tokenizer(src)
    dtype = resolve_dtype(model_cfg.get("dtype"), dev, config)
    with torch.device("meta"):  # shapes only: where each block goes
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    device_map = split_map(skeleton, devices)
    del skeleton
    if random_init:
        model = build_random_split(config, device_map, dtype=dtype, seed=int(model_cfg.get("random_seed") or 0))
        weights = "random"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=revision, config=config, dtype=dtype, attn_implementation="sdpa",
                device_map=device_map, **offline)
        except OSError as e:
            raise _not_found(path, revision, e) from e
        weights = str(model_cfg.get("weights") or "trained")
    model = dispatch(model, device_map)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = Loaded(model=model, tokenizer=tokenizer, device=dev, dtype=dtype, weights=weights, revision=revision)
    _CACHE[key] = loaded
    return loaded
