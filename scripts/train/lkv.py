"""Train LKV (paper 4; methods/lkv.py): a query-agnostic token scorer and head-wise budgets per
(layer, kv head), end to end against the frozen full-cache model.

    python -m scripts.train.lkv --model tiny --ratios 0.5,0.75,0.85      # one GPU call, ~4 min
    python -m scripts.train.lkv --smoke                                  # seconds on a CPU (tests)
    python -m scripts.train.lkv --model smollm2_135m --ratios 0.25,0.5,0.75,0.9 --variants joint \
        --n-per-task 128 --steps 300 --device cuda                       # the real model (scripts/gpu_jobs.sh lkv_smollm2)

Data: the synthetic task generators' ``train`` split (seeds never used for evaluation), at
``--context-length`` tokens, tasks ``--tasks`` (default: every task but ``niah_multikey`` and
``common_words``, which stay held out entirely). For each sample the frozen model

1. prefills the context with the full cache (every context query sees every earlier token, as in
   the harness's query-agnostic protocol) and keeps each layer's post-RoPE K and V;
2. answers greedily with the full cache: the teacher's answer tokens (up to a newline, at most
   ``--answer-tokens``) and its next-token distribution at each of them.

Training, per (variant, ratio): only the question and answer tokens run again, attending to the
stored context through a keep-mask ``m`` per (layer, kv head, token) (sinks and recent window
always 1). ``m`` is the soft top-k of the scorer's outputs with the head's budget
(``methods.lkv.soft_keep``: sum(m) equals the budget exactly, gradients to scores and budgets),
temperature annealed from 1 to 0.05 over the first ``1 - --hard-frac`` of the steps, then hard top-k
with a straight-through gradient. Loss = KL(teacher || student) per answer token (+ ``--ce`` x CE
on the teacher's tokens). Variants: ``joint`` learns budgets and scorer; ``scorer_only`` keeps the
budgets uniform (what ``allocation=uniform`` uses).

Writes the weights to methods/data/lkv/<model dir>.safetensors (or ``--weights``), extending the
file (other ratios stay), and ``--curve`` (default results/lkv/<model dir>-train.json): the
training curve per run, held-out KL (hard top-k, inference-like) before and after on seen tasks
and on the held-out ``niah_multikey``, the learned budgets, the command and timings. Imports
neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness.evaluate import model_config, split_prompt, stop_ids  # noqa: E402
from methods import lkv as L  # noqa: E402

TRAIN_TASKS = ("niah_single", "niah_multivalue", "niah_multiquery", "variable_tracking", "kv_retrieval")
HELD_OUT = ("niah_multikey", "common_words")
ATTN = "lkv_train"


def log(msg: str) -> None:
    print(f"[train_lkv {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- data -----------------------------------------------------------------------------------------
_TOK = None


def _make(job: tuple) -> tuple[list[int], list[int]]:
    global _TOK
    task, ctx_len, seed, index, tok_path = job
    from transformers import AutoTokenizer

    from tasks.synthetic import make_sample, token_counter

    if _TOK is None:
        _TOK = AutoTokenizer.from_pretrained(tok_path)
    s = make_sample(task, count_tokens=token_counter(_TOK), context_length=ctx_len, seed=seed, index=index,
                    split="train")
    return split_prompt(_TOK, s["context"], s["question"])


def make_items(tok_path: str, tasks: list[str], n_per_task: int, ctx_len: int, seed: int, workers: int) -> list:
    """(task, context ids, question ids) of ``n_per_task`` train-split samples per task."""
    jobs = [(t, ctx_len, seed, i, tok_path) for t in tasks for i in range(n_per_task)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            out = list(ex.map(_make, jobs, chunksize=8))
    else:
        out = [_make(j) for j in jobs]
    return [(j[0], c, q) for j, (c, q) in zip(jobs, out)]


# -- attention routed through a per-call state ----------------------------------------------------
class State:
    """What the attention function of the current forward pass needs."""

    def __init__(self) -> None:
        self.mode = "prefill"
        self.captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, H_kv, S, D) context K, V
        self.ctx_valid: torch.Tensor | None = None  # (B, S)
        self.suf_valid: torch.Tensor | None = None  # (B, T)
        self.masks: list[torch.Tensor] | None = None  # per layer (B, H_kv, S) keep-mask (None = full cache)


def lkv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, lkv_state=None, **kw):
    st: State = lkv_state
    scaling = float(scaling if scaling is not None else module.scaling)
    if st.mode == "prefill":  # right-padded rows: causal attention is exact for every valid token
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        st.captured.append((key.detach(), value.detach()))
        return out.transpose(1, 2), None
    li = module.layer_idx
    kc, vc = st.kv[li]
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    q = query.float().reshape(B, Hkv, G, T, D)
    lc = torch.einsum("bhgtd,bhsd->bhgts", q, kc.float()) * scaling  # (B, H_kv, G, T, S)
    ls = torch.einsum("bhgtd,bhsd->bhgts", q, key.float()) * scaling  # (B, H_kv, G, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=query.device).tril()[None] & st.suf_valid[:, None, :]
    lc = lc.masked_fill(~st.ctx_valid[:, None, None, None, :], float("-inf"))
    ls = ls.masked_fill(~causal[:, None, None], float("-inf"))
    mx = torch.maximum(lc.amax(-1), ls.amax(-1)).detach()[..., None]
    ec, es = torch.exp(lc - mx), torch.exp(ls - mx)
    if st.masks is not None:  # a token's weight times its keep-mask: renormalised attention over kept tokens
        ec = ec * st.masks[li][:, :, None, None, :]
    den = ec.sum(-1) + es.sum(-1)
    out = (torch.einsum("bhgts,bhsd->bhgtd", ec, vc.float()) + torch.einsum("bhgts,bhsd->bhgtd", es, value.float()))
    out = out / den[..., None]
    return out.reshape(B, Hq, T, D).transpose(1, 2).to(query.dtype), None


def install(model) -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN, lkv_attention)
    AttentionMaskInterface.register(ATTN, lambda *a, **k: None)
    model.set_attn_implementation(ATTN)


def pad(rows: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), value, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        valid[i, : len(r)] = True
    return ids.to(device), valid.to(device)


# -- the teacher ----------------------------------------------------------------------------------
@torch.no_grad()
def teach(model, items: list, *, batch: int, answer_tokens: int, stops: set[int], pad_id: int, device) -> list[dict]:
    """Per batch of samples: context K/V per layer, question + teacher answer ids, teacher log-probs."""
    out = []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        ctx, ctx_valid = pad([c for _, c, _ in chunk], pad_id, device)
        n = ctx_valid.sum(1)
        st = State()
        model(input_ids=ctx, position_ids=torch.arange(ctx.shape[1], device=device)[None].expand_as(ctx),
              lkv_state=st, use_cache=False, logits_to_keep=1)
        st.mode, st.kv, st.ctx_valid = "suffix", st.captured, ctx_valid
        seqs = [list(q) for _, _, q in chunk]
        q_len = [len(q) for _, _, q in chunk]
        done = [False] * len(chunk)
        for _ in range(answer_tokens):  # greedy answers with the full cache
            logits = suffix_logits(model, st, seqs, n, pad_id, device)
            for i, seq in enumerate(seqs):
                if not done[i]:
                    t = int(logits[i, len(seq) - 1].argmax())
                    seq.append(t)
                    done[i] = t in stops
            if all(done):
                break
        logits = suffix_logits(model, st, seqs, n, pad_id, device)
        A = max(len(sq) - ql for sq, ql in zip(seqs, q_len))
        tgt = torch.zeros(len(chunk), A, dtype=torch.long, device=device)
        tmask = torch.zeros(len(chunk), A, dtype=torch.bool, device=device)
        at = torch.zeros(len(chunk), A, dtype=torch.long, device=device)  # position predicting answer token j
        for i, (sq, ql) in enumerate(zip(seqs, q_len)):
            a = len(sq) - ql
            tgt[i, :a] = torch.tensor(sq[ql:], device=device)
            tmask[i, :a] = True
            at[i, :a] = torch.arange(ql - 1, ql - 1 + a, device=device)
        teacher = torch.log_softmax(logits.float().gather(1, at[..., None].expand(-1, -1, logits.shape[-1])), -1)
        out.append({"tasks": [t for t, _, _ in chunk], "kv": [(k, v) for k, v in st.captured], "ctx_valid": ctx_valid,
                    "n": n, "seqs": seqs, "at": at, "tgt": tgt, "tmask": tmask, "teacher": teacher.to(torch.bfloat16)})
    return out


def suffix_logits(model, st: State, seqs: list[list[int]], n: torch.Tensor, pad_id: int, device) -> torch.Tensor:
    ids, valid = pad(seqs, pad_id, device)
    st.suf_valid = valid
    pos = n[:, None] + torch.arange(ids.shape[1], device=device)[None]
    return model(input_ids=ids, position_ids=pos, lkv_state=st, use_cache=False).logits


# -- the student ----------------------------------------------------------------------------------
class Params(torch.nn.Module):
    def __init__(self, n_layers: int, n_heads: int, head_dim: int, hidden: int, *, learn_budgets: bool, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        Fd = 2 * head_dim + 2
        self.w1 = torch.nn.Parameter(torch.randn(n_layers, n_heads, Fd, hidden, generator=g) / math.sqrt(Fd))
        self.b1 = torch.nn.Parameter(torch.zeros(n_layers, n_heads, hidden))
        self.w2 = torch.nn.Parameter(torch.randn(n_layers, n_heads, hidden, generator=g) / math.sqrt(hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(n_layers, n_heads))
        self.theta = torch.nn.Parameter(torch.zeros(n_layers, n_heads), requires_grad=learn_budgets)

    def rho(self, ratio: float, floor: float) -> torch.Tensor:
        return L.head_fractions(self.theta, 1.0 - ratio, floor)


def keep_masks(p: Params, b: dict, rho: torch.Tensor, inv_freq, scale, *, n_sink: int, window: int, temp: float,
               hard: bool, scorer: str = "learned") -> list[torch.Tensor]:
    """Per layer (B, H_kv, S) keep-masks for one teacher batch."""
    from methods.selectors import protect_mask

    out = []
    valid = b["ctx_valid"]  # (B, S)
    n = b["n"]
    S = valid.shape[1]
    s_idx = torch.arange(S, device=valid.device)
    for li, (k, v) in enumerate(b["kv"]):
        if scorer == "learned":
            k_pre = L.unrotate(k, s_idx[None, None], inv_freq, scale)
            scores = L.score_tokens(L.scorer_features(k_pre, v), p.w1[li], p.b1[li], p.w2[li], p.b2[li])
        else:  # recency: the uniform scorer's order
            scores = s_idx.float()[None, None].expand(k.shape[0], k.shape[1], S)
        budget = rho[li][None, :] * n[:, None].float()  # (B, H)
        # protected as at inference (methods.selectors.protect_mask): sinks, then the recent window, within the budget
        prot = protect_mask(n, budget.detach().round().long(), n_slots=S, n_sink=n_sink, window=window)  # (B, H, S)
        keep = (budget - prot.sum(-1)).clamp(min=0)
        c = valid[:, None] & ~prot
        m = L.soft_keep(scores, keep, c, temp)
        if hard:
            s_masked = scores.detach().masked_fill(~c, float("-inf"))
            order = s_masked.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(-1, order, s_idx.expand_as(order))
            m_hard = ((rank < keep.detach().round()[..., None]) & c).float()
            m = m_hard + m - m.detach()
        out.append(torch.where(prot, torch.ones_like(m), m))
    return out


def kl_loss(model, st: State, b: dict, masks, pad_id: int, device, ce: float = 0.0) -> tuple[torch.Tensor, dict]:
    st.mode, st.kv, st.ctx_valid, st.masks = "suffix", b["kv"], b["ctx_valid"], masks
    logits = suffix_logits(model, st, b["seqs"], b["n"], pad_id, device)
    lp = torch.log_softmax(logits.float().gather(1, b["at"][..., None].expand(-1, -1, logits.shape[-1])), -1)
    t = b["teacher"].float()
    kl = (t.exp() * (t - lp)).sum(-1)  # (B, A)
    m = b["tmask"].float()
    loss = (kl * m).sum() / m.sum()
    nll = -(lp.gather(-1, b["tgt"][..., None])[..., 0] * m).sum() / m.sum()
    agree = ((lp.argmax(-1) == b["tgt"]).float() * m).sum() / m.sum()
    return loss + ce * nll, {"kl": float(loss.detach()), "nll": float(nll.detach()), "agree": float(agree)}


@torch.no_grad()
def evaluate(model, st, batches, p, rho, inv_freq, scale, args, pad_id, device, scorer="learned") -> dict:
    tot = {"kl": 0.0, "nll": 0.0, "agree": 0.0}
    for b in batches:
        masks = keep_masks(p, b, rho, inv_freq, scale, n_sink=args.n_sink, window=args.window, temp=0.05,
                           hard=True, scorer=scorer)
        _, m = kl_loss(model, st, b, masks, pad_id, device)
        for k in tot:
            tot[k] += m[k] / len(batches)
    return {k: round(v, 5) for k, v in tot.items()}


def train_one(model, batches, evals, *, ratio: float, variant: str, args, spec, inv_freq, scale, pad_id, device):
    p = Params(spec["n_layers"], spec["n_kv_heads"], spec["head_dim"], args.hidden,
               learn_budgets=variant == "joint", seed=args.seed).to(device)
    opt = torch.optim.Adam([{"params": [p.w1, p.b1, p.w2, p.b2], "lr": args.lr},
                            {"params": [p.theta], "lr": args.lr_budget}])
    st = State()
    uniform = torch.full((spec["n_layers"], spec["n_kv_heads"]), 1.0 - ratio, device=device)

    def rho_now():
        return p.rho(ratio, args.budget_floor) if variant == "joint" else uniform

    before = {name: evaluate(model, st, ev, p, rho_now(), inv_freq, scale, args, pad_id, device)
              for name, ev in evals.items()}
    recency = {name: evaluate(model, st, ev, p, uniform, inv_freq, scale, args, pad_id, device, scorer="uniform")
               for name, ev in evals.items()}
    curve = [{"step": 0, "eval_kl": before["seen_tasks"]["kl"]}]
    soft_steps = int(args.steps * (1 - args.hard_frac))
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed + 1)
    run = []
    for step in range(args.steps):
        hard = step >= soft_steps
        temp = 0.05 if hard else math.exp(math.log(1.0) + (math.log(0.05) - math.log(1.0)) * step / max(1, soft_steps - 1))
        b = batches[int(torch.randint(len(batches), (1,), generator=g))]
        rho = rho_now()
        masks = keep_masks(p, b, rho, inv_freq, scale, n_sink=args.n_sink, window=args.window, temp=temp, hard=hard)
        loss, m = kl_loss(model, st, b, masks, pad_id, device, ce=args.ce)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.append(m["kl"])
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            curve.append({"step": step + 1, "temp": round(temp, 4), "hard": hard,
                          "kl": round(sum(run) / len(run), 5)})
            run = []
            if (step + 1) % args.eval_every == 0 or step == args.steps - 1:  # inference-like: hard top-k, held out
                curve[-1]["eval_kl"] = evaluate(model, st, evals["seen_tasks"], p, rho_now().detach(), inv_freq, scale,
                                                args, pad_id, device)["kl"]
            if (step + 1) % (args.log_every * 5) == 0 or step == args.steps - 1:
                log(f"{variant} r={ratio} step {step + 1}: kl {curve[-1]['kl']:.4f} temp {temp:.3f}"
                    f"{' (hard)' if hard else ''}")
    train_s = time.perf_counter() - t0
    rho = rho_now().detach()
    after = {name: evaluate(model, st, ev, p, rho, inv_freq, scale, args, pad_id, device)
             for name, ev in evals.items()}
    w = L.LKVWeights(p.w1.detach(), p.b1.detach(), p.w2.detach(), p.b2.detach(), rho)
    res = {"variant": variant, "ratio": ratio, "steps": args.steps, "train_s": round(train_s, 1),
           "eval_before": before, "eval_after": after, "eval_recency_uniform": recency,
           "kl_drop": {k: round(1 - after[k]["kl"] / before[k]["kl"], 4) if before[k]["kl"] else None for k in before},
           "rho": [[round(x, 4) for x in row] for row in rho.tolist()], "curve": curve}
    return w, res


# -- main -----------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="a conf/model name or a local model directory")
    ap.add_argument("--ratios", default="0.5,0.75,0.85", help="eviction ratios (fraction removed), comma-separated")
    ap.add_argument("--variants", default="joint,scorer_only", help=f"of {L.VARIANTS}")
    ap.add_argument("--tasks", default=",".join(TRAIN_TASKS), help="training tasks (held out: niah_multikey, common_words)")
    ap.add_argument("--context-length", type=int, default=2048)
    ap.add_argument("--n-per-task", type=int, default=384, help="training samples per task")
    ap.add_argument("--n-eval", type=int, default=48, help="held-out samples per evaluation set")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--hard-frac", type=float, default=0.2, help="share of the steps with hard top-k (straight-through)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lr-budget", type=float, default=3e-2)
    ap.add_argument("--budget-floor", type=float, default=0.2, help="each head keeps >= floor x the mean retention")
    ap.add_argument("--ce", type=float, default=0.0, help="weight of the CE on the teacher's answer tokens")
    ap.add_argument("--hidden", type=int, default=32, help="scorer MLP width")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--log-every", type=int, default=10, help="steps per curve point (mean training KL)")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between held-out KL points (hard top-k)")
    ap.add_argument("--weights", default=None, help="output file (default methods/data/lkv/<model dir>.safetensors)")
    ap.add_argument("--curve", default=None, help="training-curve JSON (default results/lkv/<model dir>-train.json)")
    ap.add_argument("--overwrite", action="store_true", help="replace a weights file that holds another model's weights")
    ap.add_argument("--smoke", action="store_true", help="a seconds-long CPU run: 256 tokens, 2 tasks, 6 steps")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.context_length, args.n_per_task, args.n_eval, args.batch, args.steps = 256, 4, 4, 4, 6
        args.tasks, args.log_every, args.window, args.answer_tokens, args.workers = "niah_single,niah_multivalue", 2, 8, 8, 1
        args.eval_every = 2
    args.ratios = [float(r) for r in str(args.ratios).split(",") if r]
    args.variants = [v for v in args.variants.split(",") if v]
    args.tasks = [t for t in args.tasks.split(",") if t]
    bad = [v for v in args.variants if v not in L.VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; use {', '.join(L.VARIANTS)}")
    leaked = sorted(set(args.tasks) & set(HELD_OUT))
    if leaked:
        ap.error(f"{leaked} are held out from LKV training (evaluated as unseen tasks); drop them from --tasks")
    for r in args.ratios:
        if not 0 < r < 1:
            ap.error(f"ratios are fractions removed, in (0, 1); got {r}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse(argv)
    t_all = time.perf_counter()
    from harness.loading import load, tokenizer_path
    from methods.api import ModelSpec

    cfg = model_config(args.model)
    tok_path = tokenizer_path(cfg)  # a GGUF model's: its converted checkpoint (harness/loading.py)

    t = time.perf_counter()  # the data first: worker processes fork before CUDA starts
    train_items = make_items(tok_path, args.tasks, args.n_per_task, args.context_length, args.seed, args.workers)
    eval_seen = make_items(tok_path, args.tasks, max(1, args.n_eval // len(args.tasks)), args.context_length,
                           args.seed + 10_000, args.workers)
    eval_held = make_items(tok_path, ["niah_multikey"], args.n_eval, args.context_length, args.seed + 10_000,
                           args.workers)
    gen_s = time.perf_counter() - t
    log(f"{len(train_items)} training samples, {len(eval_seen)} + {len(eval_held)} held-out ({gen_s:.0f}s)")

    loaded = load(cfg, device=args.device)
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    for p in model.parameters():
        p.requires_grad_(False)
    install(model)
    spec_full = ModelSpec.from_config(model.config)
    spec = {"n_layers": spec_full.n_layers, "n_kv_heads": spec_full.n_kv_heads, "head_dim": spec_full.head_dim}
    inv_freq, scale = L.rope_of(model)
    inv_freq = inv_freq.to(device)
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    stops = set(stop_ids(tok))

    t = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_items), generator=g).tolist()
    kw = dict(batch=args.batch, answer_tokens=args.answer_tokens, stops=stops, pad_id=pad_id, device=device)
    batches = teach(model, [train_items[i] for i in order], **kw)
    evals = {"seen_tasks": teach(model, eval_seen, **kw), "niah_multikey_held_out": teach(model, eval_held, **kw)}
    teach_s = time.perf_counter() - t
    log(f"teacher: {len(batches)} batches ({teach_s:.0f}s)")

    runs, entries = [], {}
    for ratio in args.ratios:
        for variant in args.variants:
            w, res = train_one(model, batches, evals, ratio=ratio, variant=variant, args=args, spec=spec,
                               inv_freq=inv_freq, scale=scale, pad_id=pad_id, device=device)
            log(f"{variant} r={ratio}: held-out KL {res['eval_before']['seen_tasks']['kl']:.4f} -> "
                f"{res['eval_after']['seen_tasks']['kl']:.4f} (seen tasks), "
                f"{res['eval_before']['niah_multikey_held_out']['kl']:.4f} -> "
                f"{res['eval_after']['niah_multikey_held_out']['kl']:.4f} (niah_multikey); recency "
                f"{res['eval_recency_uniform']['seen_tasks']['kl']:.4f}")
            runs.append(res)
            entries[(variant, ratio)] = w

    model_dir = Path(str(model.config._name_or_path).rstrip("/")).name
    command = "python -m scripts.train.lkv " + " ".join(shlex.quote(a) for a in args.argv)
    weights_path = Path(args.weights) if args.weights else L.default_weights_path(model_dir)
    hyper = {k: getattr(args, k) for k in ("context_length", "n_per_task", "batch", "steps", "hard_frac", "lr",
                                           "lr_budget", "budget_floor", "ce", "hidden", "answer_tokens", "seed")}
    meta = {"model": args.model, "model_dir": model_dir, "spec": spec, "fingerprint": L.weights_fingerprint(model),
            "n_sink": args.n_sink, "window": args.window, "hidden": args.hidden, "tasks": args.tasks,
            "held_out": list(HELD_OUT),
            "trained": {f"{v}/{L.ratio_key(r)}": {"command": command, "n_sink": args.n_sink, "window": args.window,
                                                  **hyper} for (v, r) in entries}}
    if not args.smoke or args.weights:
        L.save_weights(weights_path, meta, entries, overwrite=args.overwrite)
        log(f"weights -> {weights_path}")
    curve_path = Path(args.curve) if args.curve else REPO / "results" / "lkv" / f"{model_dir}-train.json"
    summary = {"command": command, "model": args.model, "device": str(device),
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
               "samples": {"train": len(train_items), "eval_seen": len(eval_seen), "eval_held_out": len(eval_held)},
               "seconds": {"data": round(gen_s, 1), "teacher": round(teach_s, 1),
                           "total": round(time.perf_counter() - t_all, 1)},
               "hyper": hyper, "meta": {k: meta[k] for k in ("spec", "fingerprint", "n_sink", "window", "tasks", "held_out")},
               "runs": runs}
    if not args.smoke or args.curve:
        curve_path.parent.mkdir(parents=True, exist_ok=True)
        curve_path.write_text(json.dumps(summary, indent=1))
        log(f"curve -> {curve_path}")
    print(json.dumps({"runs": [{k: r[k] for k in ("variant", "ratio", "kl_drop", "train_s")} for r in runs],
                      "seconds": summary["seconds"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
