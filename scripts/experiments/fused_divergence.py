"""Where a method's fused decode parts from its reference path, row by row: a bug or a near tie?

    python -m scripts.experiments.fused_divergence uniform_int --ratio 0.875 --dtype float32
    python -m scripts.experiments.fused_divergence kivi --ratio 0.875 --new 40 --variants default nograph \\
        '{"num_stages": 1, "per_sm": 4}' --out $OUT/kivi2.json

The end-to-end GPU tests (``pytest -m gpu``) say only that tokens or logits differ; this says where and how.
It runs the embedded tiny model (its trained weights) on the prompts of those tests (tests/helpers.py:
``GPU_LENGTHS``, random token ids, question of ``--q-len``), once through the method's reference path
(``fused="off"``) and once per variant of the fused path:

- ``default``: as the runner decodes (CUDA graph on a GPU);
- ``nograph``: the same kernels, eager steps (``Engine.cuda_graph = False``);
- a JSON object: overrides of the scalar quantized decode's ``DECODE_CONFIG``
  (methods/kernels/quant_attention.py) for that variant.

For every row it prints the first step whose greedy token differs (or none), the largest relative logit error
(over the row's largest |logit|) at each step up to and including that one, and the reference's own margin
between its token and the fused path's there. Rounding noise parts rows only at near ties (a margin about the
size of the logit error); a real bug shows a logit error far above the dtype's noise *before* the tokens part
(fp32: ~1e-6). The first step whose error jumps tells which decode step (and so which stored length, group or
window boundary) to look at. Runs on CPU too (``TRITON_INTERPRET=1``: slow, one prompt takes about 2 minutes
at 300 tokens). The JSON (``--out``) holds the same per-row figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The end-to-end GPU tests' prompt lengths (tests/helpers.py GPU_LENGTHS): 8 equal and 8 ragged.
GPU_LENGTHS = [300] * 8 + [300, 170, 233, 64, 129, 300, 31, 250]


def prompts(lengths: list[int], q_len: int, seed: int, vocab: int = 250) -> list:
    """The GPU tests' random prompts (tests/helpers.py ``random_qa_prompts``)."""
    import torch

    from harness.engine import Prompt

    g = torch.Generator().manual_seed(seed)
    return [Prompt(context=torch.randint(3, vocab, (n,), generator=g).tolist(),
                   question=torch.randint(3, vocab, (q_len,), generator=g).tolist()) for n in lengths]


def compare(ref, fast, lengths: list[int], q_len: int) -> list[dict]:
    """Per row: first parting step, relative logit error per step up to it, the reference's margin there."""
    rows = []
    for r, (a, b, ta, tb) in enumerate(zip(ref.logits, fast.logits, ref.tokens, fast.tokens)):
        n = min(len(a), len(b))
        part = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
        upto = n if part is None else min(n, part + 1)
        scale = float(a[:upto].abs().max())
        errs = [float((a[i] - b[i]).abs().max()) / scale for i in range(upto)]
        margin = None if part is None or part >= n else float(a[part, ta[part]] - a[part, tb[part]]) / scale
        rows.append({"row": r, "tokens_in_cache_at_step0": lengths[r] + q_len, "parts_at": part,
                     "max_err": max(errs) if errs else 0.0,
                     "first_step_err_over_1e-3": next((i for i, e in enumerate(errs) if e > 1e-3), None),
                     "margin_at_part": margin, "err_per_step": [float(f"{e:.2e}") for e in errs]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", help="a method of conf/method (the catalogue's name)")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--knobs", default="{}", help="JSON: the method's other parameters")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lengths", default=",".join(map(str, GPU_LENGTHS)), help="context lengths, comma-separated")
    ap.add_argument("--q-len", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new", type=int, default=12, help="tokens to decode")
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--variants", nargs="+", default=["default", "nograph"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from harness.engine import Engine
    from harness.loading import load
    from methods import catalog

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load({"path": str(REPO / "models" / "kvbench-tiny"), "dtype": args.dtype}, device=device).model
    lengths = [int(x) for x in args.lengths.split(",") if x]
    ps = prompts(lengths, args.q_len, args.seed)
    knobs = json.loads(args.knobs)

    def run(fused: str, graph: bool = True):
        engine = Engine(model, catalog.build(args.method, ratio=args.ratio, fused=fused, **knobs),
                        prefill_chunk=args.chunk)
        engine.cuda_graph = graph
        t = time.perf_counter()
        out = engine.generate(ps, max_new_tokens=args.new, return_logits=True)
        return out, {"kernel": engine.kernel, "graph_error": engine.graph_error, "s": round(time.perf_counter() - t, 2)}

    ref, info = run("off")
    report = {"method": args.method, "ratio": args.ratio, "knobs": knobs, "dtype": args.dtype, "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu", "lengths": lengths,
              "reference": info, "variants": {}}
    print(f"[divergence] {args.method} ratio={args.ratio} {args.dtype} on {report['device_name']}: reference "
          f"{info['kernel']} in {info['s']} s", file=sys.stderr)
    for variant in args.variants:
        from methods.kernels import quant_attention as QA

        saved = dict(QA.DECODE_CONFIG)
        try:
            if variant not in ("default", "nograph"):
                QA.DECODE_CONFIG.update(json.loads(variant))
            fast, info = run("on", graph=variant != "nograph")
        finally:
            QA.DECODE_CONFIG.clear()
            QA.DECODE_CONFIG.update(saved)
        rows = compare(ref, fast, lengths, args.q_len)
        report["variants"][variant] = {**info, "rows": rows}
        parted = [r for r in rows if r["parts_at"] is not None]
        print(f"[divergence] {variant}: {info['kernel']} (graph error: {info['graph_error']}), {len(parted)} of "
              f"{len(rows)} rows part; worst logit error {max(r['max_err'] for r in rows):.2e}", file=sys.stderr)
        for r in rows:
            if r["parts_at"] is not None or r["max_err"] > 1e-3:
                print(f"  row {r['row']:2d} ({r['tokens_in_cache_at_step0']} tokens at step 0): parts at "
                      f"{r['parts_at']}, error > 1e-3 from step {r['first_step_err_over_1e-3']}, margin there "
                      f"{r['margin_at_part'] if r['margin_at_part'] is None else format(r['margin_at_part'], '.2e')}"
                      f", errors {r['err_per_step']}", file=sys.stderr)
    text = json.dumps(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
