"""Precompute the Lloyd-Max scalar codebooks TurboQuant-style quantizers use (docs/PAPERS.md §1, §6).

    python -m scripts.train.lloyd_max            # rewrite methods/data/lloyd_max.json (commit it)
    python -m scripts.train.lloyd_max --check    # recompute and compare with the stored file

A unit vector x in R^d after a random rotation has coordinates with the Beta-type law
f(t) ~ (1 - t^2)^((d - 3) / 2) on [-1, 1], which tends to N(0, 1/d). The file holds, for
b = 1..8 bits, the 2^b centroids and 2^b - 1 decision boundaries of the MSE-optimal (Lloyd-Max)
quantizer of

- ``gaussian``: a standard normal (scale by 1/sqrt(d) for a coordinate of a unit vector);
- ``beta_d<d>``: the exact coordinate law for d in 32, 64, 128, 256, stored in the same units
  (multiplied by sqrt(d)), so both families decode the same way.

and the distortion E(X - Q(X))^2 of each (in those units: the MSE of a whole unit vector, since d
coordinates of variance 1/d each contribute it). Lloyd's iteration runs on a fine grid in float64
from quantile-spaced centroids until the centroids move less than 1e-12.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[2] / "methods" / "data" / "lloyd_max.json"
BITS = range(1, 9)
BETA_DIMS = (32, 64, 128, 256)
GRID = 400_001


def _density(law: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points (in units where the law has variance ~1) and normalised weights."""
    if law == "gaussian":
        x = torch.linspace(-12.0, 12.0, GRID, dtype=torch.float64)
        w = torch.exp(-0.5 * x * x)
    else:
        d = int(law.removeprefix("beta_d"))
        t = torch.linspace(-1.0, 1.0, GRID, dtype=torch.float64)[1:-1]
        w = torch.exp((d - 3) / 2 * torch.log1p(-t * t))
        x = t * math.sqrt(d)
    return x, w / w.sum()


def lloyd_max(law: str, bits: int, *, tol: float = 1e-12, max_iter: int = 100_000) -> dict:
    x, w = _density(law)
    cw = torch.cumsum(w, 0)  # mass up to each grid point
    cm = torch.cumsum(w * x, 0)  # first moment up to each grid point
    levels = 1 << bits
    q = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    c = x[torch.searchsorted(cw, q).clamp_max(len(x) - 1)]  # quantile-spaced start
    for _ in range(max_iter):
        bnd = (c[1:] + c[:-1]) / 2
        idx = torch.searchsorted(x, bnd)  # grid cells [idx_i, idx_{i+1})
        edges = torch.cat([torch.tensor([0]), idx, torch.tensor([len(x)])])
        mass = torch.cat([torch.zeros(1, dtype=torch.float64), cw])[edges]
        mom = torch.cat([torch.zeros(1, dtype=torch.float64), cm])[edges]
        new = (mom[1:] - mom[:-1]) / (mass[1:] - mass[:-1]).clamp_min(1e-300)
        moved = float((new - c).abs().max())
        c = new
        if moved < tol:
            break
    bnd = (c[1:] + c[:-1]) / 2
    cell = torch.searchsorted(bnd, x)
    distortion = float((w * (x - c[cell]) ** 2).sum())
    return {"centroids": c.tolist(), "boundaries": bnd.tolist(), "distortion": distortion}


def compute() -> dict:
    laws = ["gaussian"] + [f"beta_d{d}" for d in BETA_DIMS]
    out: dict = {"_doc": "Lloyd-Max codebooks (centroids, boundaries, distortion) in units of sqrt(d) * coordinate; "
                 "written by scripts/train/lloyd_max.py"}
    for law in laws:
        out[law] = {str(b): lloyd_max(law, b) for b in BITS}
        print(law, [round(out[law][str(b)]["distortion"], 5) for b in BITS], file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="recompute and compare with the stored file")
    args = ap.parse_args(argv)
    data = compute()
    if args.check:
        stored = json.loads(OUT.read_text())
        worst = max(abs(a - b) for law in data if law != "_doc" for bits in data[law]
                    for a, b in zip(data[law][bits]["centroids"], stored[law][bits]["centroids"]))
        print(json.dumps({"max_abs_centroid_diff": worst}))
        return 0 if worst < 1e-6 else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps({"written": str(OUT)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
