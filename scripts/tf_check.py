"""Teacher-forced check of a tiny-model checkpoint on training episodes: which answer tokens it gets right.

    python scripts/tf_check.py --model .ckpt/r9 --task dense_niah --length 256 --episodes 24
    python scripts/tf_check.py --model models/kvbench-tiny --task niah_multikey --length 1024 --word-values 1

Builds episodes exactly as ``scripts/train_tiny_model.py`` does at stage 0 (``split="train"``, a seed of its
own), runs the model once over each, and per question kind (``real``: the evaluation's question;
``scaffold``: the needle's own words) reports the share whose first answer token is right and whose every
trained token is right, with the first few questions printed (target vs argmax, teacher-forced). This is how
the digit-value plateau of runs 7-9 was diagnosed (models/kvbench-tiny/README.md, session 4): first token
wrong, the rest copied. CPU, fp32; imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv: list[str] | None = None) -> int:
    import torch
    import train_tiny_model as T
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a saved model directory (its tokenizer is used)")
    ap.add_argument("--task", default="dense_niah", choices=[t for t in T.TRAIN_TASKS if t != "ppl"])
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--scaffold", type=float, default=0.72)
    ap.add_argument("--word-values", type=float, default=0.0)
    ap.add_argument("--show", type=int, default=8, help="questions to print")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args(argv)

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ratios = T.calibrate(args.model, 0)
    T.WORD_VALUES[0] = args.word_values
    maker = T.BatchMaker(args.model, ratios, args.seed, 7, 0, args.length, scaffold=args.scaffold)
    maker.stage = 0
    stats: dict[str, list[int]] = {}
    by_pos: dict[int, list[int]] = {}  # answer token position -> [right, total]
    shown = 0
    for _ in range(args.episodes):
        ep = maker.episode(args.task, args.length)
        if ep is None:
            continue
        ids, spans = ep
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        for st, en, _first in spans:
            before = maker.tok.decode(ids[max(0, st - 14) : st])
            kind = "real" if "mentioned" in before or "JSON" in before else "scaffold"
            target, got = ids[st:en], pred[st - 1 : en - 1]
            n = maker.trained_end(args.task, ids, st, en) - st  # trained tokens only ("\n", EOS excluded)
            s = stats.setdefault(kind, [0, 0, 0])
            s[0] += 1
            s[1] += got[0] == target[0]
            s[2] += got[:n] == target[:n]
            for j in range(n):
                c = by_pos.setdefault(j, [0, 0])
                c[0] += got[j] == target[j]
                c[1] += 1
            if shown < args.show:
                shown += 1
                print(f"{kind:8s} ...{before[-36:]!r} target {maker.tok.decode(target[:n])!r} "
                      f"argmax {maker.tok.decode(got[:n])!r}")
    for kind, (n, first, whole) in sorted(stats.items()):
        print(f"{kind}: {n} questions, first token right {first / n:.2f}, whole answer right {whole / n:.2f}")
    print("token accuracy by answer position (teacher-forced): "
          + " ".join(f"{j}:{r / t:.2f}" for j, (r, t) in sorted(by_pos.items()) if t >= 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
