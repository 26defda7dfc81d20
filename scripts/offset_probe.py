"""CPU micro-experiment behind issue 4: does the gap between a needle's key and its value slow the forming of
key matching? (models/kvbench-tiny/README.md, "Training experiments so far".)

    python scripts/offset_probe.py GAP STEPS [D_MODEL] [LAYERS]     # e.g. 0 1500 64 2, then 3 1500 64 2

A token-level multi-query recall task as in models/kvbench-tiny/README.md ("The token-level recall recipe"): 96 random tokens (vocab 512)
holding 8 needles ``KEY k1 k2 IS [GAP fixed tokens] v1 v2 v3 DOT``, then the 8 keys asked back as
``Q k1 k2 IS [GAP]`` -> ``v1 v2 v3 DOT``; a randomly initialised LlamaForCausalLM, AdamW lr 2e-3, batch 64,
loss on the answer tokens. Prints teacher-forced accuracy of the first value token and of all three every
100 steps. About 0.35 s a step on one CPU thread at D_MODEL 64, 2 layers. PROBE_VOCAB and PROBE_BATCH (env)
change the vocabulary (512) and the number of sequences per step (64); PROBE_DIGITS=1 draws values from 10
tokens; PROBE_LEN (96) and PROBE_HEAD_DIM (32) set the context length and the head size; PROBE_WD_GROUPS=1
excludes embeddings and norms from weight decay, as scripts/train_tiny_model.py does.
"""

import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

V = int(os.environ.get("PROBE_VOCAB", 512))  # vocabulary
KEY, IS, Q, DOT = 1, 2, 3, 4
FIXED = (5, 6, 7, 8)  # the gap tokens after IS, in order
LO = 16  # keys, values and filler are drawn from [LO, V)
DIGITS = os.environ.get("PROBE_DIGITS") == "1"  # values drawn from 10 tokens only
LEN = int(os.environ.get("PROBE_LEN", 96))  # context tokens before the questions
HEAD_DIM = int(os.environ.get("PROBE_HEAD_DIM", 32))
WITH_DOT = os.environ.get("PROBE_DOT") == "1"  # the loss also covers the DOT after the value (as the `notes` task)


def episode(rng: random.Random, gap: int, L: int = LEN, n: int = 8) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 mask of the answer tokens (v1 v2 v3) of one sequence."""
    fix = list(FIXED[:gap])
    if DIGITS:  # values from a 10-symbol alphabet (the digit tokens of the text needles)
        pairs = [([rng.randrange(LO, V) for _ in range(2)], [rng.randrange(LO, LO + 10) for _ in range(3)])
                 for _ in range(n)]
    else:
        pairs = [([rng.randrange(LO, V) for _ in range(2)], [rng.randrange(LO, V) for _ in range(3)]) for _ in range(n)]
    body = [rng.randrange(LO, V) for _ in range(L - n * (6 + gap))]
    cuts = sorted(rng.randrange(len(body) + 1) for _ in range(n))
    ids, last = [], 0
    for (k, v), c in zip(pairs, cuts):
        ids += body[last:c] + [KEY] + k + [IS] + fix + v + [DOT]
        last = c
    ids += body[last:]
    mask = [0] * len(ids)
    for j in rng.sample(range(n), n):
        k, v = pairs[j]
        ids += [Q] + k + [IS] + fix + v + [DOT]
        mask += [0] * (4 + gap) + [1, 1, 1, int(WITH_DOT)]
    return ids, mask


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    gap, steps = int(argv[0]), int(argv[1])
    d = int(argv[2]) if len(argv) > 2 else 64
    layers = int(argv[3]) if len(argv) > 3 else 2
    if not 0 <= gap <= len(FIXED):
        raise SystemExit(f"GAP must be 0..{len(FIXED)}, got {gap}")
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=4 * d, num_hidden_layers=layers,
                      num_attention_heads=max(1, d // HEAD_DIM), num_key_value_heads=max(1, d // 64), head_dim=HEAD_DIM,
                      max_position_embeddings=1024, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if os.environ.get("PROBE_WD_GROUPS") == "1":  # as scripts/train_tiny_model.py: no decay on embeddings and norms
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if p.dim() >= 2 and "embed" not in n], "weight_decay": 0.1},
                  {"params": [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
    opt = torch.optim.AdamW(groups, lr=2e-3, betas=(0.9, 0.95))
    B, t0 = int(os.environ.get("PROBE_BATCH", 64)), time.time()
    for step in range(1, steps + 1):
        eps = [episode(rng, gap) for _ in range(B)]
        x = torch.tensor([e[0] for e in eps])
        sel = torch.tensor([e[1] for e in eps]).bool()[:, 1:]
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, step / 100)
        h = model.model(input_ids=x[:, :-1]).last_hidden_state
        logits_sel = model.lm_head(h[sel])  # logits at the answer positions only
        loss = F.cross_entropy(logits_sel, x[:, 1:][sel])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                k = 4 if WITH_DOT else 3
                pred = logits_sel.argmax(-1).view(B, -1, k)[..., :3]
                tgt = x[:, 1:][sel].view(B, -1, k)[..., :3]
                first = (pred[..., 0] == tgt[..., 0]).float().mean().item()
                every = (pred == tgt).all(-1).float().mean().item()
            print(f"gap {gap} d {d} layers {layers} step {step} loss {loss.item():.3f} first {first:.2f} "
                  f"all {every:.2f} ({time.time() - t0:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
