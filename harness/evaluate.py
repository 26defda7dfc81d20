"""Per-sample accuracy of (model, task, method, context length) cells without lm-eval or Hydra.

The diagnostics in ``scripts/experiments/`` (``fixed_contract.py``, ``lkv_length_generalization.py``) compare
methods on the same samples with paired statistics, over grids too large for one harness row per
cell; they run on the GPU machine with torch, transformers and PyYAML only. :class:`Evaluator`
prefills each sample's context with the engine, compresses at ``end_of_context`` (or with the
question under ``protocol=query_aware``), generates greedily up to a newline and scores with the
task's own metric (``tasks.synthetic.score``). Per-sample scores are cached on disk by a hash of
what decides them (model path, device and dtype, task, length, n, seed, protocol, method and its
parameters, the trained weights a method loads), so an interrupted grid resumes. The code is not in
the key: after changing a method, delete ``<out>/cache``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STOP = "\n"

__all__ = ["Evaluator", "model_config", "split_prompt", "stop_ids", "mean_se", "ci95", "sign"]


def model_config(name: str) -> dict:
    """A conf/model entry by name (``tiny``) or a path to a local model directory."""
    path = REPO / "conf" / "model" / f"{name}.yaml"
    if path.exists():
        import yaml

        return yaml.safe_load(path.read_text())
    return {"name": Path(name).name, "path": name}


def split_prompt(tok: Any, context: str, question: str) -> tuple[list[int], list[int]]:
    """Tokenize context + question once and split at the first token starting in the question."""
    enc = tok(context + question, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    i = next((j for j, (a, b) in enumerate(offsets) if a >= len(context) and b > a), len(ids))
    return ids[:i], ids[i:]


def stop_ids(tok: Any) -> list[int]:
    """EOS and every token whose text contains a newline (an answer ends there)."""
    ids = {int(tok.eos_token_id)} if tok.eos_token_id is not None else set()
    ids |= {i for i in range(len(tok)) if STOP in tok.decode([i])}
    return sorted(ids)


def mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def ci95(xs: list[float]) -> tuple[float, float]:
    m, se = mean_se(xs)
    return max(0.0, m - 1.96 * se), min(1.0, m + 1.96 * se)


def sign(d: float) -> int:
    return (d > 1e-12) - (d < -1e-12)


class Evaluator:
    """Per-sample scores of one (model, task, method) at a context length, cached on disk.

    ``args`` carries n, seed, protocol, max_new_tokens, prefill_chunk, batch_size, device and a
    default context_length (an argparse namespace of the calling script)."""

    def __init__(self, args: Any, out: Path, *, tag: str = "eval"):
        self.args, self.cache, self.tag = args, Path(out) / "cache", tag
        self.cache.mkdir(parents=True, exist_ok=True)
        self._loaded: dict[str, tuple] = {}
        self._samples: dict[tuple, list] = {}

    def load(self, model_name: str, rope: dict | None = None) -> tuple:
        key = f"{model_name} {json.dumps(rope, sort_keys=True)}"
        if key not in self._loaded:
            from harness.loading import load

            cfg = {**model_config(model_name), **({"rope": rope} if rope else {})}
            loaded = load(cfg, device=self.args.device)
            self._loaded = {key: (cfg, loaded, stop_ids(loaded.tokenizer))}  # one model at a time
        return self._loaded[key]

    def rope_for(self, model_name: str, context_length: int) -> dict | None:
        """RoPE scaling for a context beyond the model's window when ``args.rope_beyond_window`` names a
        rope_type (e.g. linear): factor = the smallest power of two that fits prompt + generation; None within."""
        kind = getattr(self.args, "rope_beyond_window", None)
        if not kind:
            return None
        window = int(self.load(model_name)[1].model.config.max_position_embeddings)
        need = int(context_length) + int(self.args.max_new_tokens)
        if need <= window:
            return None
        return {"rope_type": str(kind), "factor": float(2 ** math.ceil(math.log2(need / window)))}

    def samples(self, model_name: str, task: str, context_length: int) -> list:
        key = (model_name, task, context_length)
        if key not in self._samples:
            from tasks.synthetic import make_samples, token_counter

            _, loaded, _ = self.load(model_name)
            tok = loaded.tokenizer
            raw = make_samples(task, count_tokens=token_counter(tok), context_length=context_length,
                               n=self.args.n, seed=self.args.seed)
            self._samples[key] = [(split_prompt(tok, s["context"], s["question"]), s["answers"]) for s in raw]
        return self._samples[key]

    def scores(self, model_name: str, task: str, method: Any, label: str,
               context_length: int | None = None) -> tuple[list[float], dict]:
        """Per-sample scores and {"ratio_achieved": ...} (KV bytes at the end of the context)."""
        ctx = int(context_length or self.args.context_length)
        params = {"method": type(method).__name__, **asdict(method)}
        ident: dict[str, Any] = {"model": model_name, "task": task, "ctx": ctx, "n": self.args.n,
                                 "seed": self.args.seed, "protocol": self.args.protocol,
                                 "max_new": self.args.max_new_tokens, "chunk": self.args.prefill_chunk,
                                 "params": params}
        rope = self.rope_for(model_name, ctx)
        if rope:  # only then: the cache keys of runs within the window stay as they were
            ident["rope"] = rope
        cfg, loaded, _ = self.load(model_name, rope)
        ident["run_on"] = {"path": str(cfg.get("path")), "device": loaded.device.type, "dtype": str(loaded.dtype)}
        if hasattr(method, "cache_identity"):  # trained weights a method loads (LKV)
            ident["weights"] = method.cache_identity(loaded.model.config._name_or_path)
        key = json.dumps(ident, sort_keys=True, default=str)
        path = self.cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.exists():
            rec = json.loads(path.read_text())
            return rec["scores"], rec["kv"]
        from harness.engine import Prompt
        from harness.session import Unsupported, open_session
        from tasks.synthetic import score

        cfg, loaded, stops = self.load(model_name, rope)
        try:  # validate -> calibrate -> engine, as the runner does (harness/session.py)
            engine = open_session(model=loaded.model, tokenizer=loaded.tokenizer, method=method, device=loaded.device,
                                  dtype=loaded.dtype, seed=int(self.args.seed),
                                  prefill_chunk=self.args.prefill_chunk).engine
        except Unsupported as e:
            raise ValueError(f"{label}: {e}") from e
        items = self.samples(model_name, task, ctx)
        out: list[float] = []
        kv_full = kv_stored = 0
        t0 = time.perf_counter()
        bs = self.args.batch_size
        for s in range(0, len(items), bs):
            batch = items[s : s + bs]
            res = engine.generate([Prompt(context=c, question=q) for (c, q), _ in batch],
                                  max_new_tokens=self.args.max_new_tokens, stop_ids=stops, protocol=self.args.protocol)
            kv_full += res.stats_context.bytes_full
            kv_stored += res.stats_context.bytes_stored
            for toks, (_, answers) in zip(res.tokens, batch):
                text = loaded.tokenizer.decode(toks, skip_special_tokens=True).split(STOP)[0]
                out.append(score(task, text, answers))
        kv = {"ratio_achieved": 1 - kv_stored / kv_full if kv_full else None}
        path.write_text(json.dumps({"ident": json.loads(key), "scores": out, "kv": kv}))
        print(f"[{self.tag}] {model_name} {task}@{ctx} {label}: acc {sum(out) / len(out):.3f} "
              f"({len(out)} samples, {time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
        return out, kv
