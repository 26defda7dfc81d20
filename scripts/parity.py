"""Engine parity against Hugging Face's own path on a tiny random model (CPU, fp32).

    python -m scripts.parity --arch qwen3 --lengths 23,17,9 --prefill-chunk 7
    python -m scripts.parity --arch llama --method uniform_int

The last stdout line is one JSON object: arch, lengths, prefill_chunk, method, max_abs_logit_diff,
tokens_match, our_attention_calls, expected_attention_calls (layers x forward passes), ...
"""

from __future__ import annotations

import argparse
import json
import sys

from harness.models import ARCHS  # noqa: E402
from methods import catalog  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--lengths", default="23,17,9", help="comma-separated prompt lengths (tokens)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="tokens per prefill forward (default: all)")
    ap.add_argument("--method", default="full", choices=catalog.names(), help="a method of conf/method/")
    ap.add_argument("--ratio", type=float, default=None, help="compression ratio (default: per method)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if not lengths or min(lengths) < 1:
        ap.error("--lengths needs at least one positive length")

    print("[parity] importing torch and transformers", file=sys.stderr, flush=True)
    from harness.engine import UnsupportedModel
    from harness.parity import run_parity

    try:
        report = run_parity(
            arch=args.arch,
            lengths=lengths,
            prefill_chunk=args.prefill_chunk,
            method=args.method,
            ratio=args.ratio,
            n_new=args.new_tokens,
            seed=args.seed,
            log=lambda msg: print(f"[parity] {msg}", file=sys.stderr, flush=True),
        )
    except (UnsupportedModel, ValueError) as e:
        print(f"parity: cannot run {args.method} on {args.arch}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
