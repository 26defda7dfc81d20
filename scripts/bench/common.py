"""What every part of the decode benchmark shares: the cells, the engines' names, byte accounting, timers and
the random prompts."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]

CELLS = "1x8192,1x32768,1x131072,8x8192,8x32768,32x8192"
TOO_BIG = "8x131072,32x32768"  # listed as skipped with their KV size
ENGINES = ("kvbench", "hf_eager", "hf_static_compile")
EXTRA_ENGINES = ("kvbench_modules",)  # ablation: kvbench with its decode step through the HF modules
BUDGET_80GB = 80e9


def emit_lines(lines: list[str], out: str | None) -> int:
    """A kernel micro-benchmark's markdown: printed, and written to ``out`` when given; returns the exit code 0."""
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
    print(text)
    return 0


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_cells(spec: str) -> list[tuple[int, int]]:
    out = []
    for c in filter(None, spec.split(",")):
        try:
            b, s = c.lower().split("x")
            out.append((int(b), int(s)))
        except ValueError:
            raise SystemExit(f"bad cell {c!r}: write batch x context, e.g. 8x32768") from None
    return out


def kv_bytes_per_token(config: Any, itemsize: int = 2) -> int:
    """K and V of one token over all layers, each KV head once."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


def weight_bytes_read(model: Any) -> int:
    """Bytes of weights one decode step reads: all of them but the input embedding table (a step reads B
    rows of it), unless the table is tied to the LM head (which reads all of it)."""
    from harness.measure import weights_bytes

    total = weights_bytes(model)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and (head.weight is emb or (emb.device.type != "meta"
                                                          and head.weight.data_ptr() == emb.data_ptr()))
    return int(total - (0 if tied else emb.numel() * emb.element_size()))


def meta_model(name: str) -> Any:
    """The conf/model ``name`` on the meta device (shapes and dtype, no memory): what ``--report`` needs to
    merge rows on a machine without the GPU."""
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    from harness.loading import resolve_dtype

    config = AutoConfig.from_pretrained(REPO / cfg["path"])
    dtype = resolve_dtype(cfg.get("dtype"), torch.device("cuda"), config)  # what load(..., device="cuda") picks
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def pcts(xs: list[float]) -> tuple[float, float]:
    from harness.measure import percentile

    return percentile(xs, 0.5), percentile(xs, 0.9)


class CudaTimer:
    """Per-step device time with CUDA events (host time on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> CudaTimer:
        if self.cuda:
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.b.record()
            self.b.synchronize()
            self.ms = self.a.elapsed_time(self.b)
        else:
            self.ms = 1000 * (time.perf_counter() - self.t0)


def chunk_for(B: int, args: argparse.Namespace) -> int:
    """Prefill chunk (tokens per row per forward pass) of a batch of B rows."""
    return max(16 if args.smoke else 256, args.prefill_tokens // B)


def random_ids(B: int, S: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(vocab, 32000), (B, S), generator=g).to(device)
