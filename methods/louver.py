"""``louver``: decode attention as halfspace range search over keys, with zero false negatives
(Dehghankar & Asudeh, "Sparse Attention as a Range Searching Problem: Towards an Inference-Efficient
Index for KV Cache", arXiv:2605.06763; docs/PAPERS.md §5).

Every token stays (K/V are not compressed); a decode step reads only the keys whose Cauchy-Schwarz
upper bound reaches the query's threshold t, scores them exactly and attends over them plus a dense
buffer of recent tokens. ``ratio`` maps onto the read fraction: ``threshold="budget"`` sets t so that a
fraction f = 1 - ratio of a key sample scores at least t. The row reports the bytes actually read
(index included) in ``kv_bytes_read_per_step`` / ``read_ratio_achieved``; ``kv_bytes_stored`` is the
full K/V plus the index, so ``ratio_achieved`` is negative: Louver trades memory for reads.

Index (built per (layer, kv head) at ``end_of_context``, over the context keys):
- head_dim D is split into ``n_subspaces`` S contiguous subspaces of D/S dims. Default S = 32 (the
  paper code's default is 8): on the tiny model's 64-dim heads at f = 0.1, ``scripts/experiments/index_recall.py``
  measured 71% of keys scanned at S = 8, 41% at S = 16, 15% at S = 32, and the bytes read per step
  (index included) are lowest at S = 32 (row read_ratio_achieved 0.06 at S = 16, 0.23 at S = 32, both
  with int16 parent ids). ``branching`` (keys per parent) defaults to the paper's 4: rows at ratio 0.9 on
  niah_multikey at 4K (8 samples; int16 ids) read_ratio_achieved 0.233 / 0.252 / 0.183 / 0.038 at 4 / 8 /
  16 / 32 keys per parent (S = 32), -0.04 / -0.12 at 8 / 16 (S = 16): smaller balls scan fewer keys but
  the gate reads more centres, so 8 reads slightly less on this model. Parent ids are **bit-packed**,
  ceil(log2 P) bits for P parents (11 at 4K and branching 4, not int16's 16): read_ratio_achieved 0.313
  (branching 4) and 0.344 (branching 8) on the same rows; scanned_frac 0.15 / 0.20 at 4 / 8
  (index_recall.py, f = 0.1). Issue 8's row (``method=louver ratio=0.9 task=niah_multikey
  context_length=4096 limit=200``, CPU, the run-13 tiny model that retrieves by key): read_ratio_achieved 0.320,
  accuracy 1.00 as full's 1.00 and quest's 1.00 (quest reads less: read_ratio_achieved 0.383); index_recall.py
  on that model at f = 0.1: 0 false negatives, recall@10 1.00, scanned_frac 0.148 (quest recall@10 0.75).
  Three other ways to shrink the index read were measured and dropped (same capture, f = 0.1, union of a
  kv head's 3 query heads): grouping in 16 subspaces with two balls per parent (16 parent ids a key)
  scans 0.41 of keys per query, as plain S = 16; building the index per 1,024-key chunk (8-bit parent
  ids) raises the union from 0.35 to 0.45; fp8 centres and radii raise it to 0.44: each costs in
  survivors' K/V about what it saves in index bytes;
- in each subspace the keys are grouped into parents of about ``branching`` keys by a *balanced PCA
  tree*: recursively split each group at the median of its projection onto its principal axis (power
  iteration), with leaf counts kept proportional, until there are ceil(n / branching) leaves of
  ``branching`` or ``branching - 1`` keys. Chosen because it is balanced by construction, vectorises
  over heads and subspaces, and needs no iterations to converge; the paper's code uses k-center
  clustering with balanced assignment (5 refinement iterations).
- each parent is a ball: centre mu = mean of its children (rounded to the store's dtype), radius
  r = max child distance to that rounded centre, computed in fp32 and rounded *up* when stored;
- ``parent`` maps each key slot to its parent in every subspace (stored as one bit stream per row, kv
  head and subspace, :func:`pack_ids`; the reference gate unpacks it); a reservoir sample of
  ``sample_size`` keys per kv head (Algorithm R over the indexed stream) sets thresholds.

The gate, and why it has zero false negatives. For a query q and a key k with parent ball (mu_s, r_s)
in subspace s, Cauchy-Schwarz gives
    q_s.k_s = q_s.mu_s + q_s.(k_s - mu_s) <= q_s.mu_s + |q_s| |k_s - mu_s| <= q_s.mu_s + |q_s| r_s =: ub_s,
and summing over the subspaces, q.k = sum_s q_s.k_s <= sum_s ub_s(parent_s(k)) =: U(k).
A key survives iff U(k) >= t - margin, so every key with q.k >= t survives: zero false negatives by
construction, whatever the clustering. The per-subspace form of the same test: a parent p of
subspace s can be pruned with all its children when ub_s(p) < t - sum_{s' != s} max_p' ub_s'(p'),
thresholds that sum to t minus the slack of the other subspaces. Note that an AND over subspaces
with fixed thresholds t_s summing to t (or the paper code's t_s = min over sample keys of the
subspace partial products) is *not* exact: a key above t may fall below t_s in one subspace and make
up for it in another. Gates run in fp32; ``margin = gate_eps * |q| * max|k|`` absorbs fp32 rounding of
the sums (the paper's fp16 gates missed 0.08% of keys).

Decode (T == 1): thresholds per query head from the sample (``budget``: the ceil(f * m)-th largest of
the m sample scores; the paper's oracle modes ``sample_max``, ``sample_mean_max`` = (max + mean) / 2,
``sample_gap`` = the score above the largest gap in the top half of the sorted sample scores; oracle
modes do not use ``ratio`` except ratio 0); exact softmax over the survivors and the buffer; the buffer
(question and generated tokens) is merged into the index every ``merge_every`` steps (256 in the paper).
Prefill and the question attend densely (the paper sparsifies decode only). ratio 0 reads everything
and equals ``full``. A kv head's bytes read count each key once however many of its query heads
select it; the gate reads every parent's centre and radius, every indexed key's parent ids and the
sample.

``index=grid`` (issue 21): the gate a GPU can stream, and the one the fused kernels run. The ball index above
(``index=balls``, the default) bounds a key by the sum over 32 subspaces of its parents' bounds: a decode step
gathers, per key, 32 parent ids and 32 ball bounds from tables of N/4 parents, random accesses that cost a GPU
more than reading the key itself (at D = 64 the ids alone are 60 of a key's 128 K bytes), so no kernel of it
beats dense flash-decoding. The grid keeps Louver's contract (a per-key upper bound of q.k against the sampled
threshold, zero false negatives, exact attention over the survivors and the buffer) with cells that need no
table: each channel d of a kv head is cut into 255 equal steps between the context keys' min lo_d and max
(``grid_bounds``), a key stores its 8-bit cell per channel (code = round((k_d - lo_d) / step_d), clamped) and
err = |k - k^| (fp32), its distance to its grid point k^ = lo + code * step. Then
    q.k = q.k^ + q.(k - k^) <= q.k^ + |q| err        (Cauchy-Schwarz, per key),
and q.k^ = q.lo + sum_d (q_d step_d) code_d: one dot product with the codes, streamed like a quantized key.
A key survives iff that bound reaches t - gate_eps |q| kmax; so every key with q.k >= t survives, whatever
the grid (keys outside the context's range clamp and carry a larger err). It is the paper's PQ-subspace
clustering (an ablation of theirs) at one dimension per subspace with uniform cells, bounded per key. Keys are
encoded as they are written (the question, every decode token); ``merge_every`` still decides when the buffer
of recent tokens joins the gated keys. The threshold sample is the context's (a reservoir of ``sample_size``
keys at ``end_of_context``; the ball index keeps sampling at merges). Thresholds ``budget`` and
``sample_max``. Measured by scripts/experiments/index_recall.py on the tiny model (niah_multikey, 2 x 4096 tokens,
f = 0.1): 0 false negatives, recall@10 1.00, 0.109 of the keys scanned per query head (balls: 0.148), reads
per step 0.41 of the dense K/V index included (balls: 0.52), index 154 KB per (layer, kv head) (balls:
194 KB), built in 1.9 s on CPU (balls: 60 s). Per step the gate reads every indexed key's code and err (D + 4
bytes), the grid (lo, step) and the sample. ``fused`` (auto: on CUDA) runs it on the sparse-read kernels
(``FusedLouverGridStore``, CUDA-graph safe; methods/kernels/sparse_attention.py); ``index=balls`` always takes
the reference path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from methods.api import LayerSpec, MethodBase, ModelSpec
from methods.kernels import FUSED_CHOICES, use_fused
from methods.sparse_fused import FusedSparseRead
from methods.stores import SparseReadStore

THRESHOLDS = ("budget", "sample_max", "sample_mean_max", "sample_gap")
INDEXES = ("balls", "grid")
GRID_THRESHOLDS = ("budget", "sample_max")
GRID_LEVELS = 255  # 8-bit codes


# -- the index: pure tensor functions (the store, tests and scripts/experiments/index_recall.py use them) --------
def balanced_groups(x: Tensor, valid: Tensor, *, branching: int, power_iters: int = 4) -> tuple[Tensor, Tensor]:
    """Group each point set into ceil(n / branching) leaves of ``branching`` or fewer points (never
    empty) by a balanced PCA tree. x (N, W, d) fp32; valid (N, W) bool.

    Returns parent (N, W) long (leaf of each point, -1 for invalid points; leaves numbered from 0
    per set) and the number of leaves per set (N,) long.
    """
    N, W, d = x.shape
    dev = x.device
    r = valid.sum(1)  # (N,) points per set
    p_root = (r + branching - 1) // branching  # (N,) leaves per set
    P_max = int(p_root.max()) if N else 0
    L = max(0, math.ceil(math.log2(P_max))) if P_max > 0 else 0
    Wp = branching * (1 << L)
    xp = torch.zeros(N, Wp, d, dtype=torch.float32, device=dev)
    vp = torch.zeros(N, Wp, dtype=torch.bool, device=dev)
    order = torch.full((N, Wp), -1, dtype=torch.long, device=dev)
    # valid points first, in order (padding after): a row's valid count is r
    rank = torch.where(valid, valid.long().cumsum(1) - 1, (~valid).long().cumsum(1) - 1 + r[:, None])  # (N, W)
    xp.scatter_(1, rank[..., None].expand(N, W, d), x.float())
    vp.scatter_(1, rank, valid)
    order.scatter_(1, rank, torch.arange(W, device=dev).expand(N, W))
    p = p_root[:, None]  # (N, g) leaves to make in each group
    for level in range(L):
        g, m = 1 << level, Wp >> level
        half = m // 2
        xs, vs, os_ = xp.view(N, g, m, d), vp.view(N, g, m), order.view(N, g, m)
        w = vs.float()[..., None]  # (N, g, m, 1)
        cnt = vs.sum(2)  # (N, g)
        mean = (xs * w).sum(2) / cnt.clamp(min=1)[..., None]  # (N, g, d)
        xc = (xs - mean[:, :, None]) * w  # (N, g, m, d)
        cov = xc.transpose(-1, -2) @ xc  # (N, g, d, d)
        axis = torch.nn.functional.one_hot(cov.diagonal(dim1=-2, dim2=-1).argmax(-1), d).float()  # (N, g, d)
        for _ in range(power_iters):
            axis = (cov @ axis[..., None])[..., 0]
            axis = axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-30)
        proj = (xc * axis[:, :, None]).sum(-1).masked_fill(~vs, float("inf"))  # (N, g, m)
        srt = proj.argsort(dim=-1, stable=True)  # (N, g, m): valid by projection, then padding
        p_l = (p + 1) // 2  # (N, g) leaves of the left half
        c = torch.where(p > 0, (cnt * p_l + p - 1) // p.clamp(min=1), cnt)  # ceil(cnt * p_l / p) points left
        i = torch.arange(m, device=dev)  # sorted position
        j = i - cnt[..., None]  # padding index (>= 0 for padding)
        pad_left = half - c  # (N, g)
        dest = torch.where(
            i < cnt[..., None],
            torch.where(i < c[..., None], i, half + i - c[..., None]),
            torch.where(j < pad_left[..., None], c[..., None] + j, half + cnt[..., None] - c[..., None] + j - pad_left[..., None]),
        )  # (N, g, m): new position of the point at sorted position i
        src = torch.empty_like(dest).scatter_(2, dest, srt)  # (N, g, m): old position of each new slot
        xp = xs.gather(2, src[..., None].expand(N, g, m, d)).reshape(N, Wp, d)
        vp = vs.gather(2, src).reshape(N, Wp)
        order = os_.gather(2, src).reshape(N, Wp)
        p = torch.stack([p_l, p - p_l], dim=-1).reshape(N, 2 * g)
    leaf_of_group = p.cumsum(1) - 1  # (N, 2^L): groups with p == 1 are the leaves, numbered in order
    leaf = leaf_of_group.repeat_interleave(branching, dim=1)  # (N, Wp)
    leaf = torch.where(vp, leaf, torch.full_like(leaf, -1))
    parent = torch.full((N, W + 1), -1, dtype=torch.long, device=dev)
    parent.scatter_(1, torch.where(order >= 0, order, torch.full_like(order, W)), leaf)
    return parent[:, :W], p_root


def ball_bounds(x: Tensor, parent: Tensor, n_parents: int, *, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Enclosing balls of the groups: x (N, W, d) fp32, parent (N, W) long (-1 = none).

    Returns centres (N, P, d) in ``dtype`` (the mean, rounded) and radii (N, P) in ``dtype``: the max
    distance of a child to the *rounded* centre, computed in fp32 and rounded up, so the bound holds
    for the stored values. Parents without children get radius 0 (no key refers to them).
    """
    N, W, d = x.shape
    ok = parent >= 0
    idx = parent.clamp(min=0)
    sums = torch.zeros(N, n_parents + 1, d, device=x.device).scatter_add_(
        1, torch.where(ok, idx, n_parents)[..., None].expand(N, W, d), x.float())[:, :n_parents]
    cnt = torch.zeros(N, n_parents + 1, device=x.device).scatter_add_(
        1, torch.where(ok, idx, n_parents), ok.float())[:, :n_parents]
    centres = (sums / cnt.clamp(min=1)[..., None]).to(dtype)  # (N, P, d)
    c = centres.float().gather(1, idx[..., None].expand(N, W, d))  # (N, W, d)
    dist = torch.where(ok, (x.float() - c).norm(dim=-1), torch.zeros((), device=x.device))  # (N, W)
    radii = torch.zeros(N, n_parents + 1, device=x.device).scatter_reduce_(
        1, torch.where(ok, idx, n_parents), dist, reduce="amax")[:, :n_parents]
    up = 1.0 + 2.0 * torch.finfo(dtype).eps  # round-to-nearest errs by <= eps/2 relative: stored radius >= r
    return centres, (radii * up).to(dtype)


class BallIndex(NamedTuple):
    centres: Tensor  # (B, H_kv, S, P, D/S)
    radii: Tensor  # (B, H_kv, S, P)
    parent: Tensor  # (B, H_kv, S, N) long, -1 = not indexed


def build_index(keys: Tensor, valid: Tensor, *, n_subspaces: int, branching: int, dtype: torch.dtype | None = None,
                power_iters: int = 4) -> BallIndex:
    """Louver's index over keys (B, H_kv, N, D); valid (B, N) bool. Parents are numbered per
    (row, head, subspace) from 0; P = the most any of them has."""
    B, H, N, D = keys.shape
    S, ds = n_subspaces, D // n_subspaces
    x = keys.float().reshape(B, H, N, S, ds).permute(0, 1, 3, 2, 4).reshape(B * H * S, N, ds)  # (BHS, N, ds)
    v = valid[:, None, None, :].expand(B, H, S, N).reshape(B * H * S, N)
    parent, n_par = balanced_groups(x, v, branching=branching, power_iters=power_iters)
    P = int(n_par.max()) if n_par.numel() else 0
    centres, radii = ball_bounds(x, parent, P, dtype=dtype or keys.dtype)
    return BallIndex(centres.view(B, H, S, P, ds), radii.view(B, H, S, P), parent.view(B, H, S, N))


def thresholds(qg: Tensor, sample: Tensor, sample_valid: Tensor, *, mode: str, fraction: float) -> Tensor:
    """Per-query thresholds from a key sample. qg (B, H_kv, G, D) fp32; sample (B, H_kv, M, D);
    sample_valid (B, H_kv, M) bool -> t (B, H_kv, G) fp32 (-inf where the sample is empty)."""
    scores = torch.einsum("bhgd,bhmd->bhgm", qg.float(), sample.float())  # (B, H_kv, G, M)
    scores = scores.masked_fill(~sample_valid[:, :, None], float("-inf"))
    srt = scores.sort(-1, descending=True).values  # (B, H_kv, G, M)
    m = sample_valid.sum(-1)[:, :, None].expand_as(srt[..., 0])  # (B, H_kv, G)
    if mode == "budget":
        k = torch.ceil(fraction * m.double()).long().clamp(min=1)
        t = srt.gather(-1, (k - 1).clamp(max=srt.shape[-1] - 1)[..., None])[..., 0]
    elif mode == "sample_max":
        t = srt[..., 0]
    elif mode == "sample_mean_max":
        mean = torch.where(torch.isfinite(srt), srt, torch.zeros_like(srt)).sum(-1) / m.clamp(min=1)
        t = (srt[..., 0] + mean) / 2
    elif mode == "sample_gap":
        top = max(1, srt.shape[-1] // 2)
        gaps = srt[..., :top] - srt[..., 1 : top + 1] if srt.shape[-1] > 1 else torch.zeros_like(srt[..., :1])
        pos = torch.arange(gaps.shape[-1], device=srt.device)
        gaps = torch.where((pos + 1 < m[..., None]) & (pos < (m[..., None] + 1) // 2), gaps, torch.full_like(gaps, -1))
        gaps = torch.nan_to_num(gaps, nan=-1.0, posinf=-1.0, neginf=-1.0)
        t = srt.gather(-1, gaps.argmax(-1, keepdim=True))[..., 0]
    else:
        raise ValueError(f"unknown threshold mode {mode!r}; use one of {THRESHOLDS}")
    return torch.where(m > 0, t, torch.full_like(t, float("-inf")))


def upper_bounds(qg: Tensor, index: BallIndex) -> Tensor:
    """U(k) = sum_s q_s.mu_s + |q_s| r_s over each key's parents: qg (B, H_kv, G, D) fp32 ->
    (B, H_kv, G, N) fp32 (keys outside the index get -inf)."""
    B, H, G, D = qg.shape
    S, P, ds = index.centres.shape[2:]
    N = index.parent.shape[-1]
    qs = qg.float().reshape(B, H, G, S, ds)  # (B, H_kv, G, S, ds)
    ub = torch.einsum("bhgsd,bhspd->bhgsp", qs, index.centres.float())  # (B, H_kv, G, S, P)
    ub = ub + qs.norm(dim=-1)[..., None] * index.radii.float()[:, :, None]
    par = index.parent.long()
    bound = ub.gather(-1, par.clamp(min=0)[:, :, None].expand(B, H, G, S, N)).sum(3)  # (B, H_kv, G, N)
    return bound.masked_fill((par < 0).any(2)[:, :, None], float("-inf"))


def survivors(qg: Tensor, index: BallIndex, t: Tensor, *, kmax: Tensor, gate_eps: float) -> Tensor:
    """Keys whose upper bound reaches t (B, H_kv, G) minus the fp32 margin -> (B, H_kv, G, N) bool.
    Every key with q.k >= t is among them (module docstring)."""
    margin = gate_eps * qg.float().norm(dim=-1) * kmax[:, :, None].float()  # (B, H_kv, G)
    return upper_bounds(qg, index) >= (t - margin)[..., None]


# -- bit-packed parent ids -------------------------------------------------------------------------
def id_bits(n_ids: int) -> int:
    """Bits that hold ids 0 .. n_ids - 1."""
    return max(1, math.ceil(math.log2(max(2, n_ids))))


def pack_ids(ids: Tensor, bits: int) -> Tensor:
    """ids (..., N) integers in [0, 2**bits) -> (..., ceil(N * bits / 32)) int32: one little-endian bit
    stream per row (id j occupies bits j*bits .. j*bits+bits-1; an id may straddle two words)."""
    *lead, N = ids.shape
    n_words = (N * bits + 31) // 32
    pos = torch.arange(N, device=ids.device) * bits
    word, off = pos // 32, pos % 32
    v = ids.to(torch.int64)
    lo = (v << off) & 0xFFFFFFFF
    hi = v >> (32 - off)  # the bits past the first word (0 when the id fits in it)
    out = torch.zeros(*lead, n_words + 1, dtype=torch.int64, device=ids.device)
    out.scatter_add_(-1, word.expand(*lead, N), lo)  # disjoint bits: add == or
    out.scatter_add_(-1, (word + 1).expand(*lead, N), hi)
    out = out[..., :n_words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_ids(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_ids`: (..., n_words) int32 -> (..., n) int64."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)
    pos = torch.arange(n, device=words.device) * bits
    word, off = pos // 32, pos % 32
    lead = w.shape[:-1]
    lo = w.gather(-1, word.expand(*lead, n)) >> off
    hi = w.gather(-1, (word + 1).expand(*lead, n)) << (32 - off)
    return (lo | hi) & ((1 << bits) - 1)


# -- the method ----------------------------------------------------------------------------------
@dataclass
class Louver(MethodBase):
    """Range-search index over keys; ``ratio`` sets the read fraction f = 1 - ratio (``budget``)."""

    ratio: float = 0.9
    n_subspaces: int = 32
    branching: int = 4
    threshold: str = "budget"
    sample_size: int = 256
    merge_every: int = 256
    power_iters: int = 4
    gate_eps: float = 1e-5
    seed: int = 0
    index: str = "balls"
    fused: str = "auto"

    family = "sparse"
    memory = "physical"
    kernel = "fused"  # index=grid has a fused path; rows record the path that actually ran
    name = "louver"

    def __post_init__(self) -> None:
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"unknown threshold {self.threshold!r}; use one of {THRESHOLDS}")
        if self.index not in INDEXES:
            raise ValueError(f"unknown index {self.index!r}; use one of {INDEXES}")
        if self.fused not in FUSED_CHOICES:
            raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {self.fused!r}")
        for knob in ("n_subspaces", "branching", "sample_size", "merge_every"):
            if int(getattr(self, knob)) < 1:
                raise ValueError(f"{knob} must be >= 1, got {getattr(self, knob)}")
        if int(self.power_iters) < 0 or float(self.gate_eps) < 0:
            raise ValueError("power_iters and gate_eps must be >= 0")

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)  # the ratio's range: MethodBase.ratio_reasons
        if self.index == "balls" and model.head_dim % int(self.n_subspaces):
            reasons.append(f"n_subspaces={self.n_subspaces} does not divide head_dim {model.head_dim}")
        if self.index == "grid" and self.threshold not in GRID_THRESHOLDS:
            reasons.append(f"index=grid takes threshold {' or '.join(GRID_THRESHOLDS)}, got {self.threshold!r}")
        return reasons

    def unsupported(self, layer: LayerSpec) -> str | None:
        """Why the fused kernels cannot serve this layer with these settings, or None."""
        from methods.kernels.sparse_attention import supports

        if self.index != "grid":
            return ("index=balls has no fused kernel: its gate sums, per key, the bounds of the key's parents in "
                    f"{self.n_subspaces} subspaces (random gathers a GPU cannot stream); index=grid is the kernel's")
        if float(self.ratio) == 0.0:
            return "ratio 0 reads everything (the reference path equals full)"
        m = int(self.sample_size)
        if m & (m - 1) or m < 16:
            return f"sample_size {m} is not a power of two >= 16"
        return supports(layer.head_dim, layer.n_q_heads, layer.n_kv_heads)

    def new_layer(self, layer: LayerSpec, *, batch: int, capacity: int, device: Any, dtype: Any) -> LouverStore:
        cls: type[LouverStore] = LouverStore
        if self.index == "grid":
            cls = FusedLouverGridStore if use_fused(self.fused, device, self.unsupported(layer)) else LouverGridStore
        elif self.fused == "on":
            use_fused(self.fused, device, self.unsupported(layer))  # raises with the reason
        return cls(layer, self, batch=batch, capacity=capacity, device=device, dtype=dtype)


class LouverStore(SparseReadStore):
    """Dense K/V plus the ball index (preallocated parents; ``p_hi`` of them in use)."""

    index_fields = ("centres", "radii", "parent_words", "sample", "sample_valid", "kmax")
    bookkeeping = (*SparseReadStore.bookkeeping, "res_seen")

    def __init__(self, layer: LayerSpec, method: Louver, *, batch: int, capacity: int, device: Any, dtype: Any):
        super().__init__(layer, batch=batch, capacity=capacity, device=device, dtype=dtype,
                         merge_every=int(method.merge_every))
        self.method = method
        self.dense_decode = float(method.ratio) == 0.0
        self.p_hi = 0

    def _leaves(self, width: int) -> int:
        return (width + self.method.branching - 1) // self.method.branching

    def _index_reset(self) -> None:
        m, L = self.method, self.layer
        B, H, D = self.batch, L.n_kv_heads, L.head_dim
        S, ds = int(m.n_subspaces), D // int(m.n_subspaces)
        rest = self.capacity - self.hi  # question + decode slots
        p_cap = self._leaves(self.hi) + self._leaves(rest) + rest // max(1, m.merge_every) + 2
        dev, dt = self.device, self.dtype
        self.centres = torch.zeros(B, H, S, p_cap, ds, dtype=dt, device=dev)  # (B, H_kv, S, P, D/S)
        self.radii = torch.zeros(B, H, S, p_cap, dtype=dt, device=dev)  # (B, H_kv, S, P)
        # parent ids, bit-packed: id_bits(p_cap) bits per key and subspace (11 for a 4K context at branching 4,
        # where int16 would spend 16), one stream per (row, kv head, subspace); slots >= idx_end unused
        self.parent_bits = id_bits(p_cap)
        self.parent_words = torch.zeros(B, H, S, (self.capacity * self.parent_bits + 31) // 32, dtype=torch.int32,
                                        device=dev)  # (B, H_kv, S, words)
        self.sample = torch.zeros(B, H, int(m.sample_size), D, dtype=dt, device=dev)  # (B, H_kv, M, D)
        self.sample_valid = torch.zeros(B, H, int(m.sample_size), dtype=torch.bool, device=dev)
        self.kmax = torch.zeros(B, H, dtype=torch.float32, device=dev)  # (B, H_kv) max key norm
        self.res_seen = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) keys the reservoir saw

    def _index_add(self, keys: Tensor, valid: Tensor, slots: Tensor) -> None:
        m = self.method
        B, H, W, D = keys.shape
        ix = build_index(keys, valid, n_subspaces=int(m.n_subspaces), branching=int(m.branching), dtype=self.dtype,
                         power_iters=int(m.power_iters))
        P = ix.centres.shape[3]
        if self.p_hi + P > self.centres.shape[3]:
            raise RuntimeError(f"louver index capacity {self.centres.shape[3]} parents exceeded ({self.p_hi} + {P})")
        self.centres[:, :, :, self.p_hi : self.p_hi + P] = ix.centres
        self.radii[:, :, :, self.p_hi : self.p_hi + P] = ix.radii
        S = ix.parent.shape[2]
        dst = slots[:, None, None, :].expand(B, H, S, W)  # (B, H_kv, S, W)
        ids = unpack_ids(self.parent_words, self.parent_bits, self.capacity)  # (B, H_kv, S, N)
        ids.scatter_(-1, dst, torch.where(valid[:, None, None, :], ix.parent + self.p_hi, ids.gather(-1, dst)))
        self.parent_words.copy_(pack_ids(ids, self.parent_bits))
        self.p_hi += P
        norms = keys.norm(dim=-1).masked_fill(~valid[:, None, :], 0.0)  # (B, H_kv, W)
        self.kmax = torch.maximum(self.kmax, norms.amax(-1))
        self._reservoir(keys, valid)

    def _reservoir(self, keys: Tensor, valid: Tensor) -> None:
        """Algorithm R over the stream of indexed keys, vectorised over a window (last writer wins)."""
        B, H, W, D = keys.shape
        M = self.sample.shape[2]
        g = torch.Generator(device=self.device).manual_seed(
            int(self.method.seed) * 1_000_003 + self.layer.layer_idx * 1009 + self.n_merges)
        i = self.res_seen[:, None] + valid.long().cumsum(1) - 1  # (B, W) stream index of each key
        u = (torch.rand(B, H, W, generator=g, device=self.device) * (i[:, None] + 1)).long()  # (B, H_kv, W)
        target = torch.where(i[:, None] < M, i[:, None].expand(B, H, W), u)
        take = valid[:, None] & (target < M)
        score = torch.where(take, torch.arange(W, device=self.device).expand(B, H, W), -1)
        winner = torch.full((B, H, M), -1, dtype=torch.long, device=self.device).scatter_reduce(
            -1, target.clamp(max=M - 1), score, reduce="amax")  # (B, H_kv, M)
        has = winner >= 0
        new = keys.gather(2, winner.clamp(min=0)[..., None].expand(B, H, M, D))  # (B, H_kv, M, D)
        self.sample = torch.where(has[..., None], new.to(self.dtype), self.sample)
        self.sample_valid = self.sample_valid | has
        self.res_seen = self.res_seen + valid.sum(1)

    def index(self) -> BallIndex:
        ids = unpack_ids(self.parent_words, self.parent_bits, self.capacity)  # (B, H_kv, S, N)
        indexed = torch.arange(self.capacity, device=self.device)[None, :] < self.idx_end[:, None]  # (B, N)
        parent = torch.where(indexed[:, None, None, :], ids, -1)
        return BallIndex(self.centres[:, :, :, : self.p_hi], self.radii[:, :, :, : self.p_hi], parent)

    def _select(self, qg: Tensor) -> Tensor:
        m = self.method
        t = thresholds(qg, self.sample, self.sample_valid, mode=m.threshold, fraction=1.0 - float(m.ratio))
        return survivors(qg, self.index(), t, kmax=self.kmax, gate_eps=float(m.gate_eps))

    def _index_read_bytes(self) -> Tensor:
        H, S = self.layer.n_kv_heads, self.centres.shape[2]
        ds = self.centres.shape[4]
        elem = self._nominal_size()
        gate = H * S * self.p_hi * (ds + 1) * elem + self.sample[0].numel() * elem  # centres, radii, sample
        ids = self.idx_end.to(torch.float64) * H * S * self.parent_bits / 8  # packed parent ids of indexed keys
        return ids + gate

    def _index_stored_bytes(self, root: str, t: Tensor, elem: int) -> int:
        if root in ("centres", "radii"):
            return t.numel() // t.shape[3] * self.p_hi * elem
        if root == "parent_words":  # the words that hold indexed keys' ids
            words = (self.idx_end * self.parent_bits + 31) // 32  # (B,)
            return int(words.sum()) * t.shape[1] * t.shape[2] * elem
        return t.numel() * elem


# -- index=grid: the GPU-friendly gate ------------------------------------------------------------
def grid_bounds(keys: Tensor, valid: Tensor, *, chunk: int = 8192) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel grid of keys (B, H_kv, N, D) over the valid slots (B, N): lo, step = (max - lo) / 255 and
    inv = 1 / step, each (B, H_kv, D) fp32, computed in slot chunks (no fp32 copy of all keys)."""
    B, H, N, D = keys.shape
    lo = torch.full((B, H, D), float("inf"), device=keys.device)
    hi = torch.full((B, H, D), float("-inf"), device=keys.device)
    for s in range(0, N, chunk):
        k = keys[:, :, s : s + chunk].float()  # (B, H_kv, c, D)
        v = valid[:, None, s : s + chunk, None]  # (B, 1, c, 1)
        lo = torch.minimum(lo, torch.where(v, k, float("inf")).amin(2))
        hi = torch.maximum(hi, torch.where(v, k, float("-inf")).amax(2))
    empty = ~torch.isfinite(lo)  # a row without valid keys
    lo = torch.where(empty, 0.0, lo)
    step = torch.where(empty, 1.0, (hi - lo) / GRID_LEVELS).clamp(min=1e-30)
    return lo, 1.0 / step, step


def grid_kth(threshold: str, fraction: float, sample_size: int) -> Tensor:
    """The rank of the threshold among m valid sample scores, m = 0 .. sample_size (``thresholds``' rule):
    budget: max(1, ceil(f m)); sample_max: 1."""
    if threshold == "sample_max":
        return torch.ones(sample_size + 1, dtype=torch.int32)
    return torch.tensor([max(1, math.ceil(fraction * m)) for m in range(sample_size + 1)], dtype=torch.int32)


class LouverGridStore(LouverStore):
    """``index=grid``: dense K/V plus 8-bit per-channel grid codes of every key and the norm of each key's
    distance to its grid point; the gate is one dot product per key (module docstring)."""

    index_fields = ("codes", "err", "lo", "inv", "step", "sample", "sample_valid", "kmax")
    bookkeeping = (*LouverStore.bookkeeping, "kth")

    def __init__(self, layer: LayerSpec, method: Louver, *, batch: int, capacity: int, device: Any, dtype: Any):
        super().__init__(layer, method, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self.kth = grid_kth(method.threshold, 1.0 - float(method.ratio), int(method.sample_size)).to(self.device)

    def _index_reset(self) -> None:
        B, H, D, dev = self.batch, self.layer.n_kv_heads, self.layer.head_dim, self.device
        M = int(self.method.sample_size)
        self.codes = torch.zeros(B, H, self.capacity, D, dtype=torch.uint8, device=dev)  # (B, H_kv, S, D)
        self.err = torch.zeros(B, H, self.capacity, dtype=torch.float32, device=dev)  # (B, H_kv, S)
        self.lo = torch.zeros(B, H, D, dtype=torch.float32, device=dev)  # (B, H_kv, D) grid origin
        self.inv = torch.ones(B, H, D, dtype=torch.float32, device=dev)  # 1 / step
        self.step = torch.ones(B, H, D, dtype=torch.float32, device=dev)  # grid step per channel
        self.sample = torch.zeros(B, H, M, D, dtype=self.dtype, device=dev)  # (B, H_kv, M, D)
        self.sample_valid = torch.zeros(B, H, M, dtype=torch.bool, device=dev)
        self.kmax = torch.zeros(B, H, dtype=torch.float32, device=dev)  # (B, H_kv) max key norm
        self.res_seen = torch.zeros(B, dtype=torch.long, device=dev)

    def _encode(self, slots: Tensor, valid: Tensor, *, chunk: int = 8192) -> None:
        """Grid codes and errors of the stored keys at slots (B, W); kmax grows with the valid ones' norms."""
        from methods.kernels.sparse_attention import grid_encode_reference

        B, H, _, D = self.k.shape
        for s in range(0, slots.shape[1], chunk):
            sl, ok = slots[:, s : s + chunk], valid[:, s : s + chunk]  # (B, c)
            idx = sl[:, None, :, None].expand(B, H, sl.shape[1], D)
            keys = self.k.gather(2, idx)  # (B, H_kv, c, D) as stored
            code, err = grid_encode_reference(keys, self.lo, self.inv, self.step)
            self.codes.scatter_(2, idx, code)
            self.err.scatter_(2, sl[:, None, :].expand(B, H, sl.shape[1]), err)
            norms = keys.float().norm(dim=-1).masked_fill(~ok[:, None, :], 0.0)  # (B, H_kv, c)
            self.kmax.copy_(torch.maximum(self.kmax, norms.amax(-1)))

    def _index_add(self, keys: Tensor, valid: Tensor, slots: Tensor) -> None:
        if self.n_merges == 0:  # the context: the grid, every key's code, the threshold sample
            self._build(slots, valid)
        # later merges move idx_end only: keys are encoded as they are written, the sample stays the context's

    def _build(self, slots: Tensor, valid: Tensor) -> None:
        n = slots.shape[1]
        self.lo, self.inv, self.step = grid_bounds(self.k[:, :, :n], valid)
        self._encode(slots, valid)
        self._reservoir(self.k[:, :, :n], valid)

    def end_of_context(self) -> None:
        if self.built:
            return
        if not self.dense_decode:  # index the context in place (no fp32 copy of its keys)
            self._index_reset()
            slots = torch.arange(self.hi, device=self.device)[None].expand(self.batch, self.hi)  # (B, N)
            self._build(slots, slots < self.lengths[:, None])
        self.idx_end = self.lengths.clone()
        self.buf_hi = 0
        self.steps_since_merge = 0
        self.n_merges += 1
        self.built = True

    def _write_valid(self, dest: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> None:
        self._write(dest, k, v)
        if self.built and not self.dense_decode:
            self._encode(dest, valid)

    def _select(self, qg: Tensor) -> Tensor:
        from methods.kernels.sparse_attention import grid_gate_params_reference, grid_read_reference

        _, w, thr, qn = grid_gate_params_reference(qg, self.sample, self.sample_valid, self.kth, self.lo, self.step,
                                                   self.kmax, gate_eps=float(self.method.gate_eps))
        return grid_read_reference(w, thr, qn, self.codes, self.err)

    def _gate_bytes(self) -> int:
        """Index bytes a step reads besides the indexed keys' codes and errors (all kv heads): lo and step (fp32),
        the sample (nominal dtype), kmax."""
        H, D, M = self.layer.n_kv_heads, self.layer.head_dim, int(self.method.sample_size)
        return H * (2 * D * 4 + M * D * self._nominal_size() + 4)

    def _index_read_bytes(self) -> Tensor:
        per_key = self.layer.head_dim + 4  # a code byte per channel, the fp32 error
        return self.idx_end.to(torch.float64) * self.layer.n_kv_heads * per_key + self._gate_bytes()

    def _index_stored_bytes(self, root: str, t: Tensor, elem: int) -> int:
        n = int(self.lengths.sum()) * self.layer.n_kv_heads  # keys encoded (context, question, decode)
        if root == "codes":
            return n * self.layer.head_dim
        if root == "err":
            return n * 4
        if root in ("lo", "inv", "step", "kmax"):
            return t.numel() * 4
        if root == "sample_valid":
            return t.numel()
        return t.numel() * self._nominal_size()  # the sample


class FusedLouverGridStore(FusedSparseRead, LouverGridStore):
    """:class:`LouverGridStore` on the sparse-read kernels: the append encodes the new key and moves idx_end every
    ``merge_every`` steps (a device counter), one kernel sets each query head's threshold and gate operands, and
    the sparse flash-decoding kernel reads the survivors (module docstring)."""

    bookkeeping = (*LouverGridStore.bookkeeping, "acc", "steps")
    graph_state = (*FusedSparseRead.graph_state, "steps", "kmax")

    def __init__(self, layer: LayerSpec, method: Louver, *, batch: int, capacity: int, device: Any, dtype: Any):
        super().__init__(layer, method, batch=batch, capacity=capacity, device=device, dtype=dtype)
        self._fused_init()
        self.steps = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,) decode steps since the context

    def _fused_decode(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, scaling: float) -> Tensor:
        from methods.kernels import sparse_attention as sa

        sa.grid_append(k, v, self.k, self.v, self.lengths, self.seen, valid, self.idx_end, self.steps, self.codes,
                       self.err, self.lo, self.inv, self.step, self.kmax, merge_every=int(self.method.merge_every))
        B, H_q, D = q.shape
        w = torch.empty(B, H_q, D, dtype=torch.float32, device=self.device)
        thr = torch.empty(B, H_q, dtype=torch.float32, device=self.device)
        qn = torch.empty(B, H_q, dtype=torch.float32, device=self.device)
        sa.grid_gate_params(q, self.sample, self.sample_valid, self.kth, self.lo, self.step, self.kmax,
                            gate_eps=float(self.method.gate_eps), w=w, thr=thr, qn=qn)
        return sa.sparse_decode_attention(q, self.k, self.v, self.lengths, self.idx_end, scaling=scaling, gate="grid",
                                          acc=self.acc, valid=valid, codes=self.codes, err=self.err, w=w, thr=thr,
                                          qn=qn)

    def _index_bytes_booked(self, indexed: Tensor, steps: Tensor) -> Tensor:
        return indexed * (self.layer.head_dim + 4) + steps * self._gate_bytes()
