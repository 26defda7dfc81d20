"""Issue 21 (eviction half) on the GPU machine: the runner's throughput probe of ``full`` and eviction methods at
B x S on a conf/model (one process, one model load, so every method is timed in the same call as ``full``), and the
fused store against the reference store on the tiny model's tasks (greedy tokens, logits, bytes).

    python -m scripts.bench_eviction --methods full,snapkv:0.5,h2o:0.5 --batch 8 --context 32768
    python -m scripts.bench_eviction --parity-methods full:0,h2o:0.5,snapkv:0.5 --parity-n 4 --parity-len 1024

A spec is ``name:ratio[:knob=value...]`` of a conf/method YAML (built without Hydra). Rows go to ``$OUT``
(probe.jsonl, parity.jsonl) and stdout. ``python -m scripts.bench --methods`` is the integrated report; this script is the
issue's probe and its parity check. Imports neither lm-eval, wandb nor Hydra.
"""
import argparse
import gc
import json
import os
import time
import traceback

import torch

OUT = os.environ.get("OUT", "/tmp/out")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def emit(path, row):
    print(json.dumps(row, default=str), flush=True)
    with open(os.path.join(OUT, path), "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def build(spec):
    import yaml
    name, ratio, *kv = spec.split(":")
    cfg = yaml.safe_load(open(f"conf/method/{name}.yaml"))
    target = cfg.pop("_target_")
    mod, cls = target.rsplit(".", 1)
    import importlib
    kw = {**cfg, "ratio": float(ratio)}
    for item in kv:
        k, v = item.split("=")
        kw[k] = yaml.safe_load(v)
    return getattr(importlib.import_module(mod), cls)(**kw)


def probe(args):
    import yaml

    from harness.engine import Engine
    from harness.loading import load
    from harness.measure import throughput_probe
    cfg = yaml.safe_load(open(f"conf/model/{args.model}.yaml"))
    t0 = time.perf_counter()
    model = load(cfg, device=DEV).model
    emit("probe.jsonl", {"kind": "load", "s": time.perf_counter() - t0,
                         "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"})
    B, S = args.batch, args.context
    for spec in args.methods.split(","):
        t0 = time.perf_counter()
        row = {"kind": "probe", "spec": spec, "batch": B, "context": S}
        try:
            method = build(spec) if spec != "full" else __import__("methods.full", fromlist=["Full"]).Full()
            engine = Engine(model, method, prefill_chunk=max(256, 8192 // B))
            r = throughput_probe(engine, batch_size=B, context_length=S, decode_steps=args.steps,
                                 vocab_size=model.config.vocab_size, seed=0)
            row.update(r, kernel=engine.kernel, graph_error=engine.graph_error,
                       layers="fused" if engine.fused is not None else engine.fused_layers_reason, status="ok")
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}", tb=traceback.format_exc()[-1500:])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        emit("probe.jsonl", row)
        gc.collect()
        torch.cuda.empty_cache()


def parity(args):
    """Fused (CUDA graph) vs reference (eager) store on the tiny model's tasks, bf16: greedy tokens and logits."""
    import yaml

    from harness.engine import Engine, Prompt
    from harness.loading import load
    from tasks.synthetic import make_samples, token_counter
    cfg = yaml.safe_load(open("conf/model/tiny.yaml"))
    ld = load(cfg, device=DEV)
    model, tok = ld.model, ld.tokenizer
    count = token_counter(tok)
    prompts = []
    for task in ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking"):
        for s in make_samples(task, count_tokens=count, context_length=args.parity_len, n=args.parity_n, seed=0):
            ids = tok(s["context"] + s["question"], add_special_tokens=False)["input_ids"]
            nc = len(tok(s["context"], add_special_tokens=False)["input_ids"])
            prompts.append(Prompt(context=ids[:nc], question=ids[nc:]))
    for spec in args.parity_methods.split(","):
        row = {"kind": "parity", "spec": spec, "n": len(prompts), "dtype": str(next(model.parameters()).dtype)}
        try:
            outs = {}
            for fused in ("off", "auto" if DEV == "cuda" else "on"):
                m = build(spec) if spec != "full" else __import__("methods.full", fromlist=["Full"]).Full()
                m.fused = fused
                eng = Engine(model, m, prefill_chunk=128)
                outs[fused] = eng.generate(prompts, max_new_tokens=12, return_logits=True)
                row[f"kernel_{fused}"] = eng.kernel
                row[f"graph_error_{fused}"] = eng.graph_error
            a, b = outs["off"], outs["auto" if DEV == "cuda" else "on"]
            row["tokens_equal"] = sum(x == y for x, y in zip(a.tokens, b.tokens))
            row["max_logit_diff"] = max(float((x[: min(len(x), len(y))] - y[: min(len(x), len(y))]).abs().max())
                                        for x, y in zip(a.logits, b.logits))
            row["first_logit_diff"] = max(float((x[0] - y[0]).abs().max()) for x, y in zip(a.logits, b.logits))
            row["bytes_equal"] = a.stats_context.bytes_stored == b.stats_context.bytes_stored
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001
            row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}", tb=traceback.format_exc()[-1500:])
        emit("parity.jsonl", row)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--parity-methods", default="")
    ap.add_argument("--parity-len", type=int, default=1024)
    ap.add_argument("--parity-n", type=int, default=4, help="samples per task (4 tasks)")
    ap.add_argument("--model", default="llama3_8b_shape")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.parity_methods:
        parity(args)
    if args.methods:
        probe(args)
