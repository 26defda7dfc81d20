"""How well do sparse-read indexes find the keys that matter? (issue 8; docs/PAPERS.md §5)

    python -m scripts.experiments.index_recall                      # f = 0.1, niah_multikey, 2 samples x 4096 tokens
    python -m scripts.experiments.index_recall --fraction 0.25 --n-subspaces 16 --json-only

Captures post-RoPE keys and queries from the model (default: the embedded tiny model on CPU): the
context's keys (what an index built at ``end_of_context`` covers) and the queries of the question and
of greedily generated tokens (full cache). For every (sample, layer, query head, query) each method
picks the context keys it reads at a read budget f of the keys:

- ``louver``: the ball index of ``methods.louver`` (S subspaces, ~4 keys per parent), threshold t from a
  uniform sample of 256 keys (the ceil(f * 256)-th largest score), survivors = keys whose summed
  Cauchy-Schwarz bound reaches t;
- ``louver_grid``: Louver's ``index=grid`` (the fused kernels' gate): 8-bit per-channel grid codes of each key
  plus the norm of its distance to its grid point; a key is read where q . grid point + |q| err reaches the same
  threshold t (same sample);
- ``quest``: pages of 16 keys with min/max, the top ceil(f * N / 16) pages by upper-bound score;
- ``streaming_llm``: 4 sink keys + the most recent f * N - 4;
- ``random``: f * N keys uniformly at random.

Measures (means over queries; ``false_negatives`` is a total): recall@k = |true top-k by q.k that the
method reads| / k (k = 10, 100); false negatives = keys with q.k >= t (Louver's threshold for that query)
the method does not read; ``scanned_frac`` = keys read / N; ``read_frac`` = bytes one kv head reads per
step (selected keys' K and V once per kv head, plus the index the gate reads) / its dense K and V at
bf16; ``index_bytes`` per (layer, kv head) at bf16 and ``build_ms`` (index build, summed over layers).
Prints a markdown table, then one JSON line ``{"louver": {"false_negatives": 0, "recall@10": ...}, ...}``.
The scripts imports neither lm-eval, wandb nor Hydra.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from methods.capture import Capture  # noqa: E402
from methods.kernels.sparse_attention import (  # noqa: E402,E501
    grid_encode_reference,
    grid_gate_params_reference,
    grid_read_reference,
)
from methods.louver import build_index, grid_bounds, id_bits, survivors, thresholds  # noqa: E402
from methods.quest import page_scores, top_pages  # noqa: E402

BF16 = 2  # bytes per element at the nominal dtype
METHODS = ("louver", "louver_grid", "quest", "streaming_llm", "random")


def _per_kv_head(q: Tensor, n_kv: int) -> Tensor:
    """One call's queries q (1, H_q, T, D) -> (H_kv, G * T, D) fp32: query head h serves kv head h // G."""
    _, H_q, T, D = q.shape
    return q[0].float().reshape(n_kv, (H_q // n_kv) * T, D)


def capture(model_path: str, task: str, context_length: int, n_samples: int, max_new: int, seed: int) -> list[list[tuple[Tensor, Tensor]]]:
    """Per sample, per layer: (keys (H_kv, N, D) fp32 of the context, queries (H_kv, Q, D) fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.engine import Engine, Prompt
    from tasks.synthetic import make_sample, token_counter

    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
    method = Capture(qkv=False, queries_after_context=True)
    engine = Engine(model, method, prefill_chunk=512)
    out = []
    for i in range(n_samples):
        s = make_sample(task, count_tokens=token_counter(tok), context_length=context_length, seed=seed, index=i)
        ids = tok(s["context"] + s["question"], add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(s["context"], add_special_tokens=False)["input_ids"])
        engine.generate([Prompt(context=ids[:n_ctx], question=ids[n_ctx:])], max_new_tokens=max_new)
        out.append([(st.k[0, :, : st.n_context].float().clone(),
                     torch.cat([_per_kv_head(q, st.layer.n_kv_heads) for q in st.queries], dim=1))
                    for st in method.stores])
    return out


def evaluate(data: list[list[tuple[Tensor, Tensor]]], *, fraction: float, n_subspaces: int, branching: int,
             sample_size: int, page_size: int, n_sink: int, seed: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    acc: dict[str, dict[str, float]] = {m: {"false_negatives": 0, "hits10": 0, "hits100": 0, "scanned": 0.0,
                                            "read": 0.0, "n": 0} for m in METHODS}
    index_bytes = {"louver": 0.0, "louver_grid": 0.0, "quest": 0.0}
    build_ms = {"louver": 0.0, "louver_grid": 0.0, "quest": 0.0}
    n_heads = 0
    for layers in data:
        for keys, queries in layers:
            H, N, D = keys.shape
            Q = queries.shape[1]
            n_heads += H
            dense = N * 2 * D * BF16  # one kv head's K and V
            scores = torch.einsum("hqd,hnd->hqn", queries, keys)  # (H, Q, N) exact
            top10 = scores.topk(min(10, N), dim=-1).indices
            top100 = scores.topk(min(100, N), dim=-1).indices
            # louver
            t0 = time.perf_counter()
            ix = build_index(keys[None], torch.ones(1, N, dtype=torch.bool), n_subspaces=n_subspaces,
                             branching=branching, dtype=torch.bfloat16)
            build_ms["louver"] += 1000 * (time.perf_counter() - t0)
            P = ix.centres.shape[3]
            pick = torch.stack([torch.randperm(N, generator=g)[: min(sample_size, N)] for _ in range(H)])  # (H, M)
            sample = keys.gather(1, pick[..., None].expand(H, pick.shape[1], D))[None]  # (1, H, M, D)
            sample = sample.to(torch.bfloat16)
            t = thresholds(queries[None], sample, torch.ones(sample.shape[:3], dtype=torch.bool), mode="budget",
                           fraction=fraction)[0]  # (H, Q)
            kmax = keys.norm(dim=-1).amax(-1)[None]  # (1, H)
            keys_bf = keys.to(torch.bfloat16).float()  # the stored keys the index was built from
            scores_st = torch.einsum("hqd,hnd->hqn", queries, keys_bf)
            in_range = scores_st >= t[..., None]  # (H, Q, N)
            sel = {"louver": survivors(queries[None], ix, t[None], kmax=kmax, gate_eps=1e-5)[0]}
            # centres, radii and the sample at bf16; parent ids bit-packed as the store keeps them
            lbytes = (P * n_subspaces * (D // n_subspaces + 1) + sample.shape[2] * D) * BF16 + math.ceil(
                N * n_subspaces * id_bits(P) / 8)
            index_bytes["louver"] += lbytes
            # louver, index=grid: the same threshold t, the grid bound
            t0 = time.perf_counter()
            ones = torch.ones(1, N, dtype=torch.bool)
            lo, inv, step = grid_bounds(keys_bf[None], ones)
            codes, err = grid_encode_reference(keys_bf[None], lo, inv, step)
            build_ms["louver_grid"] += 1000 * (time.perf_counter() - t0)
            kth = torch.tensor([max(1, math.ceil(fraction * m)) for m in range(sample.shape[2] + 1)])
            _, w, thr, qn = grid_gate_params_reference(queries[None], sample, torch.ones(sample.shape[:3], dtype=torch.bool),
                                                       kth, lo, step, kmax, gate_eps=1e-5)
            sel["louver_grid"] = grid_read_reference(w, thr, qn, codes, err)[0]
            gbytes = N * (D + 4) + 2 * D * 4 + sample.shape[2] * D * BF16 + 4  # codes, errors, grid, sample, kmax
            index_bytes["louver_grid"] += gbytes
            # quest
            t0 = time.perf_counter()
            n_pages = math.ceil(N / page_size)
            kp = torch.nn.functional.pad(keys, (0, 0, 0, n_pages * page_size - N), value=float("nan"))
            kp = kp.view(H, n_pages, page_size, D)
            kmin = torch.nan_to_num(kp, nan=float("inf")).amin(2)[None]  # (1, H, P, D)
            kmx = torch.nan_to_num(kp, nan=float("-inf")).amax(2)[None]
            build_ms["quest"] += 1000 * (time.perf_counter() - t0)
            budget = torch.tensor([max(1, math.ceil(fraction * N / page_size))])
            pages = top_pages(page_scores(queries[None], kmin, kmx), torch.ones(1, n_pages, dtype=torch.bool), budget)[0]
            page_of = torch.arange(N) // page_size
            sel["quest"] = pages[:, :, page_of]  # (H, Q, N)
            index_bytes["quest"] += n_pages * 2 * D * BF16
            # streaming_llm and random
            n_keep = max(1, int(fraction * N + 0.5))
            pos = torch.arange(N)
            stream = (pos < min(n_sink, n_keep)) | (pos >= N - (n_keep - min(n_sink, n_keep)))
            sel["streaming_llm"] = stream.expand(H, Q, N)
            rnd = torch.zeros(H, Q, N, dtype=torch.bool)
            rnd.scatter_(-1, torch.rand(H, Q, N, generator=g).argsort(-1)[..., :n_keep], True)
            sel["random"] = rnd
            gate = {"louver": lbytes, "louver_grid": gbytes, "quest": n_pages * 2 * D * BF16, "streaming_llm": 0,
                    "random": 0}
            for name, s in sel.items():
                a = acc[name]
                a["false_negatives"] += int((in_range & ~s).sum())
                a["hits10"] += float(s.gather(-1, top10).float().mean(-1).sum())
                a["hits100"] += float(s.gather(-1, top100).float().mean(-1).sum())
                a["scanned"] += float(s.float().mean(-1).sum())
                a["n"] += H * Q
                # a kv head serves its G query heads at once: one decode step = G queries of one token;
                # approximate a step's read by the mean per-query selection (a lower bound of the union)
                a["read"] += float(((s.float().sum(-1) * 2 * D * BF16 + gate[name]) / dense).sum())
    res: dict[str, dict[str, float]] = {}
    for name, a in acc.items():
        n = max(1, a["n"])
        res[name] = {"false_negatives": int(a["false_negatives"]), "recall@10": a["hits10"] / n,
                     "recall@100": a["hits100"] / n, "scanned_frac": a["scanned"] / n, "read_frac": a["read"] / n}
        if name in index_bytes:
            res[name]["index_bytes"] = int(index_bytes[name] / max(1, n_heads))
            res[name]["build_ms"] = build_ms[name]
    return res


def markdown(res: dict[str, dict[str, float]], header: str) -> str:
    cols = ["false_negatives", "recall@10", "recall@100", "scanned_frac", "read_frac", "index_bytes", "build_ms"]
    lines = [header, "", "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in res.items():
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/kvbench-tiny")
    ap.add_argument("--task", default="niah_multikey")
    ap.add_argument("--context-length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=16)
    ap.add_argument("--fraction", type=float, default=0.1, help="read budget f = 1 - ratio")
    ap.add_argument("--n-subspaces", type=int, default=32)
    ap.add_argument("--branching", type=int, default=4)
    ap.add_argument("--sample-size", type=int, default=256)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    data = capture(args.model, args.task, args.context_length, args.samples, args.max_new, args.seed)
    cap_s = time.perf_counter() - t0
    res = evaluate(data, fraction=args.fraction, n_subspaces=args.n_subspaces, branching=args.branching,
                   sample_size=args.sample_size, page_size=args.page_size, n_sink=args.n_sink, seed=args.seed)
    n_keys = sum(k.shape[1] for layers in data for k, _ in layers[:1]) // max(1, len(data))
    n_q = sum(q.shape[1] for layers in data for _, q in layers)
    if not args.json_only:
        print(markdown(res, f"index recall at f = {args.fraction}: {args.model}, {args.task}, {args.samples} samples x "
                            f"{args.context_length} tokens (~{n_keys} context keys per head), {n_q} queries per kv head "
                            f"summed over layers, S = {args.n_subspaces}, {args.branching} keys per parent; capture "
                            f"{cap_s:.1f} s"))
    print(json.dumps(res, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
