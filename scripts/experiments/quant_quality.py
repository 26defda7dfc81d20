"""Paper 1's quality measures for TurboQuant-style KV quantization (docs/PAPERS.md §1).

    python -m scripts.experiments.quant_quality --exp turboquant_mse   # MSE stage distortion on random unit vectors
    python -m scripts.experiments.quant_quality --exp qjl_bias         # QJL inner-product error: mean, variance vs theory
    python -m scripts.experiments.quant_quality --exp kv_kqv_qkqv      # KV / KQV / QKQV side by side at n = 2..6

Each experiment prints a markdown table (stderr for the first two) and a JSON last line on stdout.

- ``turboquant_mse``: E|x - x~|^2 of the rotated Lloyd-Max stage (``methods.quantizers.TurboQuantizer``)
  on uniformly random unit vectors in R^d; published (TurboQuant, rounded) 0.36, 0.117, 0.03, 0.009,
  the Lloyd-Max distortions of a standard Gaussian 0.3634, 0.1175, 0.0345, 0.0095.
- ``qjl_bias``: for pairs (q, x) with x a random unit vector quantized by (bits-1)-bit MSE + QJL
  (m = d) and q standard Gaussian, the error <q, x~> - <q, x>; each group of 50 pairs draws its own
  sketch S (and rotation). var_theory = mean over pairs of ((pi/2)|q|^2|r|^2 - <q,r>^2) / m, with
  r = x - x~_mse the residual the sketch sees.
- ``kv_kqv_qkqv``: for each scheme (the ``turboquant_*`` methods' own codecs) and n, on synthetic
  K/V (gaussian, student_t3 heavy-tailed, low_rank: rank 8 + 10% noise) and on K/V captured from the
  tiny model (``models/kvbench-tiny``, held-out text, every layer and kv head): attention
  KL(p_ref || p_quant) (depends on K only), K geometric error (relative L2 |k - k~|/|k|, relative norm
  error ||k~| - |k||/|k| and angle in degrees), and attention-output error |o - o~|/|o| (K and V
  quantized). Means over queries and trials. The paper's Mann-Whitney statistics and "6D distance"
  are not reproduced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from methods.quantizers import TurboQuantizer  # noqa: E402
from methods.turboquant import TurboQuantKQV, TurboQuantKV, TurboQuantQKQV  # noqa: E402

SCHEMES = {"kv": TurboQuantKV, "kqv": TurboQuantKQV, "qkqv": TurboQuantQKQV}


def unit_vectors(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, dtype=torch.float64).float()
    return x / x.norm(dim=-1, keepdim=True)


def exp_turboquant_mse(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    x = unit_vectors(args.n, args.d, g)  # (N, d)
    dist = []
    for b in (1, 2, 3, 4):
        q = TurboQuantizer(dim=args.d, mse_bits=b, codebook=args.codebook, seed=args.seed)
        xh = q.decode_fields(q.encode_fields(x, meta_dtype=torch.float32), dtype=torch.float32)
        dist.append(round(float(((x - xh) ** 2).sum(-1).mean()), 5))
    ref = [0.3634, 0.1175, 0.0345, 0.0095]
    print("| bits | distortion | Lloyd-Max Gaussian | ratio |\n|---|---|---|---|", file=sys.stderr)
    for b, dd, r in zip((1, 2, 3, 4), dist, ref):
        print(f"| {b} | {dd:.5f} | {r} | {dd / r:.3f} |", file=sys.stderr)
    return {"exp": "turboquant_mse", "d": args.d, "bits": [1, 2, 3, 4], "distortion": dist, "n_vectors": args.n,
            "codebook": args.codebook}


def exp_qjl_bias(args) -> dict:
    d, m, per = args.d, args.d, 50
    g = torch.Generator().manual_seed(args.seed)
    errs, var_th = [], []
    for i in range(args.n_pairs // per):
        q = TurboQuantizer(dim=d, mse_bits=args.bits - 1, qjl_dim=m, seed=args.seed * 100_003 + i)
        x = unit_vectors(per, d, g)  # (P, d)
        qv = torch.randn(per, d, generator=g)
        xh = q.decode_fields(q.encode_fields(x, meta_dtype=torch.float32), dtype=torch.float32)
        mse = TurboQuantizer(dim=d, mse_bits=args.bits - 1, seed=args.seed * 100_003 + i) if args.bits > 1 else None
        x_mse = (mse.decode_fields(mse.encode_fields(x, meta_dtype=torch.float32), dtype=torch.float32)
                 if mse else torch.zeros_like(x))
        r = x - x_mse
        errs.append(((xh - x) * qv).sum(-1).double())
        qq, rr, qr = (qv * qv).sum(-1), (r * r).sum(-1), (qv * r).sum(-1)
        var_th.append(((math.pi / 2) * qq * rr - qr * qr).double() / m)
    e, vt = torch.cat(errs), torch.cat(var_th)
    n = len(e)
    out = {"exp": "qjl_bias", "n_pairs": n, "d": d, "m": m, "bits": args.bits, "mean": float(e.mean()),
           "stderr": float(e.std() / math.sqrt(n)), "var": float(e.var()), "var_theory": float(vt.mean())}
    print(f"| n_pairs | mean | stderr | var | var_theory | var/theory |\n|---|---|---|---|---|---|\n"
          f"| {n} | {out['mean']:.3g} | {out['stderr']:.3g} | {out['var']:.4g} | {out['var_theory']:.4g} | "
          f"{out['var'] / out['var_theory']:.3f} |", file=sys.stderr)
    return out


# -- KV / KQV / QKQV ---------------------------------------------------------------------------------
def synthetic(kind: str, n: int, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, d, generator=g)
    if kind == "student_t3":  # t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3)
        chi = (torch.randn(n, d, 3, generator=g) ** 2).sum(-1) / 3
        return torch.randn(n, d, generator=g) / chi.sqrt()
    if kind == "low_rank":
        r = 8
        return torch.randn(n, r, generator=g) @ torch.randn(r, d, generator=g) / math.sqrt(r) + 0.1 * torch.randn(
            n, d, generator=g)
    raise ValueError(kind)


def measures(q, k, v, kq, vq, causal: bool) -> dict[str, float]:
    """q (Nq, d), k v (N, d) and their quantized kq vq -> the scalar measures (means)."""
    d = q.shape[-1]
    s, sq = q @ k.T / math.sqrt(d), q @ kq.T / math.sqrt(d)  # (Nq, N)
    if causal:  # query i sees keys 0..i (queries are the last Nq positions)
        N, Nq = k.shape[0], q.shape[0]
        mask = torch.arange(N)[None, :] <= (N - Nq + torch.arange(Nq))[:, None]
        s, sq = s.masked_fill(~mask, -math.inf), sq.masked_fill(~mask, -math.inf)
    lp, lpq = torch.log_softmax(s.double(), -1), torch.log_softmax(sq.double(), -1)
    p = lp.exp()
    kl = (p * (lp - lpq)).nan_to_num(0.0).sum(-1).mean()
    o, oq = p.float() @ v, lpq.exp().float() @ vq
    kn, kqn = k.norm(dim=-1), kq.norm(dim=-1)
    cos = ((k * kq).sum(-1) / (kn * kqn).clamp_min(1e-12)).clamp(-1, 1)
    return {"kl": float(kl), "k_rel_err": float(((k - kq).norm(dim=-1) / kn).mean()),
            "k_norm_err": float(((kqn - kn).abs() / kn).mean()), "k_angle_deg": float(torch.rad2deg(torch.acos(cos)).mean()),
            "out_err": float(((o - oq).norm(dim=-1) / o.norm(dim=-1)).mean())}


def heads_synthetic(kind: str, args, g) -> list[tuple]:
    return [(synthetic("gaussian", args.n_queries, args.d, g), synthetic(kind, args.n_keys, args.d, g),
             synthetic(kind, args.n_keys, args.d, g), False) for _ in range(args.trials)]


def heads_tiny(args) -> list[tuple]:
    from harness.calibration import calibration_samples, capture_qkv
    from harness.loading import load

    loaded = load({"path": "models/kvbench-tiny", "dtype": "float32"}, device="cpu")
    samples = calibration_samples(loaded.tokenizer, n=2, length=args.n_keys, seed=args.seed)
    heads = []
    for per_layer in capture_qkv(loaded.model, samples):
        for q, k, v in per_layer:  # (1, H_q, T, D), (1, H_kv, T, D)
            group = q.shape[1] // k.shape[1]
            for h in range(k.shape[1]):
                for j in range(group):
                    heads.append((q[0, h * group + j, -args.n_queries:], k[0, h], v[0, h], True))
    return heads


def exp_kv_kqv_qkqv(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    data = {kind: heads_synthetic(kind, args, g) for kind in ("gaussian", "student_t3", "low_rank")}
    if args.tiny:
        try:
            data["tiny"] = heads_tiny(args)
        except Exception as e:  # noqa: BLE001 - the tiny model may be absent or being retrained
            print(f"tiny model K/V skipped: {type(e).__name__}: {e}", file=sys.stderr)
    ns = list(range(2, 7))
    results: dict = {}
    for name, heads in data.items():
        results[name] = {}
        for scheme, cls in SCHEMES.items():
            method = cls(ratio=0.5, seed=args.seed)
            acc: dict[str, list[float]] = {}
            for n in ns:
                vals: dict[str, list[float]] = {}
                for i, (q, k, v, causal) in enumerate(heads):
                    kq = method.roundtrip(k[None, None], bits=n, kind="k", layer_idx=i)[0, 0]
                    vq = method.roundtrip(v[None, None], bits=n, kind="v", layer_idx=i)[0, 0]
                    for key, val in measures(q, k, v, kq, vq, causal).items():
                        vals.setdefault(key, []).append(val)
                for key, vs in vals.items():
                    acc.setdefault(key, []).append(sum(vs) / len(vs))
            results[name][scheme] = acc
    cols = ("kl", "k_rel_err", "k_angle_deg", "out_err")
    head = "| data | n | " + " | ".join(f"{c} {s}" for c in cols for s in SCHEMES) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols) * len(SCHEMES))]
    for name, res in results.items():
        for i, n in enumerate(ns):
            lines.append(f"| {name} | {n} | " + " | ".join(f"{res[s][c][i]:.4g}" for c in cols for s in SCHEMES) + " |")
    print("\n".join(lines))
    i4 = ns.index(4)
    ratio = {name: res["qkqv"]["kl"][i4] / res["kqv"]["kl"][i4] for name, res in results.items()}
    print("\nKL(QKQV) / KL(KQV) at n = 4: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items())
          + " (paper: 2.25x)")
    return {"exp": "kv_kqv_qkqv", "d": args.d, "n": ns, "schemes": list(SCHEMES), "results": results,
            "kl_ratio_qkqv_over_kqv_n4": ratio}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp", required=True, choices=("turboquant_mse", "qjl_bias", "kv_kqv_qkqv"))
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=20000, help="turboquant_mse: random unit vectors")
    ap.add_argument("--codebook", default="gaussian", choices=("gaussian", "beta"))
    ap.add_argument("--n-pairs", type=int, default=10000)
    ap.add_argument("--bits", type=int, default=2, help="qjl_bias: total bits (bits-1 MSE + 1 QJL)")
    ap.add_argument("--n-keys", type=int, default=512)
    ap.add_argument("--n-queries", type=int, default=64)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--no-tiny", dest="tiny", action="store_false", help="kv_kqv_qkqv: skip the tiny model's K/V")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = {"turboquant_mse": exp_turboquant_mse, "qjl_bias": exp_qjl_bias, "kv_kqv_qkqv": exp_kv_kqv_qkqv}[args.exp](args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
