"""RateQuant report (paper 2, docs/PAPERS.md §2): fitted distortion curves per base quantizer and
perplexity of uniform, calibrated and mismatched bit allocation on the tiny model.

    python -m scripts.experiments.ratequant_report                 # markdown tables, JSON last line
    python -m scripts.experiments.ratequant_report --docs 2 --doc-length 512   # quicker

For every base quantizer (kivi, quarot, uniform_int, turboquant_kqv) it calibrates RateQuant once
(fresh: the calibration cache lives in a temporary directory) and reports the fitted beta
(published range 3.6 to 5.3), the R^2 of the log-linear fit and the calibration time. Then it
measures token perplexity on held-out text (the ``ppl`` task's eval-split filler, ``--docs``
documents of ``--doc-length`` tokens, fed in chunks of ``--chunk`` tokens that attend to the
compressed past, as the ``ppl`` task does) at 2.5 and 4 average bits for allocation = uniform,
calibrated and mismatched over kivi and quarot, next to the full cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

import torch  # noqa: E402

BASES = ("kivi", "quarot", "uniform_int", "turboquant_kqv")
ALLOCS = ("uniform", "calibrated", "mismatched")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/kvbench-tiny")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--doc-length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--bits", default="2.5,4")
    ap.add_argument("--ppl-bases", default="kivi,quarot")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small matrices: one thread is faster and steadier on a shared CPU

    from harness.calibration import calibration_samples, engine_runner
    from harness.engine import Engine
    from harness.loading import load
    from methods.api import CalibrationContext, ModelSpec
    from methods.full import Full
    from methods.ratequant import RateQuant
    from tasks.synthetic import make_ppl_docs, token_counter

    t_start = time.perf_counter()
    loaded = load({"path": args.model, "dtype": "float32"}, device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    spec = ModelSpec.from_config(model.config)
    tmp = tempfile.mkdtemp(prefix="ratequant-")

    def ctx() -> CalibrationContext:
        return CalibrationContext(model=model, spec=spec, samples=[], device="cpu", dtype=torch.float32, seed=args.seed,
                                  artifacts_dir=tmp, run=engine_runner(model),
                                  make_samples=lambda n, length: calibration_samples(tok, n=n, length=length,
                                                                                     seed=args.seed))

    fits = {}
    for base in BASES:
        m = RateQuant(ratio=0.75, base=base)
        t0 = time.perf_counter()
        m.calibrate(ctx())
        fits[base] = {"beta": m.fit["beta"], "r2": m.fit["r2"], "calibrate_s": time.perf_counter() - t0}
        print(f"[ratequant_report] {base}: beta {m.fit['beta']:.3f}, R^2 {m.fit['r2']:.3f}, "
              f"calibrated in {fits[base]['calibrate_s']:.2f}s", file=sys.stderr, flush=True)

    docs = make_ppl_docs(count_tokens=token_counter(tok), context_length=args.doc_length, n=args.docs, seed=args.seed,
                         split="eval")
    token_docs = [list(tok.encode(d["text"], add_special_tokens=False))[: args.doc_length] for d in docs]

    def ppl(method) -> float:
        engine = Engine(model, method, prefill_chunk=args.chunk)
        total, n = 0.0, 0
        for ids in token_docs:
            lp, k, _ = engine.score_rolling(ids, chunk=args.chunk)
            total, n = total + lp, n + k
        return math.exp(-total / n)

    full = ppl(Full())
    bits = [float(b) for b in args.bits.split(",")]
    table: dict = {}
    for base in args.ppl_bases.split(","):
        for b in bits:
            for alloc in ALLOCS:
                m = RateQuant(ratio=1 - b / 16, base=base, allocation=alloc)
                reasons = m.validate(spec)
                if reasons:
                    table.setdefault(base, {}).setdefault(str(b), {})[alloc] = None
                    print(f"[ratequant_report] {base} {b} {alloc}: skipped: {'; '.join(reasons)}", file=sys.stderr)
                    continue
                m.calibrate(ctx())
                value = ppl(m)
                table.setdefault(base, {}).setdefault(str(b), {})[alloc] = value
                print(f"[ratequant_report] {base} {b} bits {alloc}: ppl {value:.3f}  bits {m.bit_table.flatten().tolist()}",
                      file=sys.stderr, flush=True)

    print("| base | beta | R^2 | calibrate (s) |\n|---|---|---|---|")
    for base, f in fits.items():
        print(f"| {base} | {f['beta']:.3f} | {f['r2']:.3f} | {f['calibrate_s']:.2f} |")
    print(f"\nPerplexity, {args.docs} x {args.doc_length} held-out tokens, chunk {args.chunk}; full cache {full:.3f}\n")
    print("| base | avg bits | " + " | ".join(ALLOCS) + " |\n|---|---|" + "---|" * len(ALLOCS))
    for base, per_bits in table.items():
        for b, row in per_bits.items():
            cells = " | ".join("skipped" if row[a] is None else f"{row[a]:.3f}" for a in ALLOCS)
            print(f"| {base} | {b} | {cells} |")
    out = {"exp": "ratequant_report", "model": args.model, "beta": {k: v["beta"] for k, v in fits.items()},
           "r2": {k: v["r2"] for k, v in fits.items()}, "calibrate_s": {k: v["calibrate_s"] for k, v in fits.items()},
           "full_ppl": full, "ppl": table, "docs": args.docs, "doc_length": args.doc_length, "chunk": args.chunk,
           "seconds": time.perf_counter() - t_start}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
