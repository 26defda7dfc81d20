"""``lkv``: learned head-wise budgets and a learned query-agnostic token scorer (paper 4, LKV:
"End-to-End Learning of Head-wise Budgets and Token Selection for LLM KV Cache Eviction",
arXiv:2605.06676; docs/PAPERS.md §4). Trained by ``scripts/train/lkv.py``.

Two learned parts, both per (layer, kv head):

- **LKV-T, the token scorer.** A token's score ``s = g_{l,h}(features(k_pre, v))`` is computed from
  its own key and value when it is written: query-agnostic, no attention matrix. ``g`` is a
  two-layer MLP (``hidden`` units, SiLU). Features: the pre-RoPE key and the value, each divided by
  its RMS, plus the log of both RMS values (so a key-norm heuristic is representable). Pre-RoPE keys
  are recovered from the stored post-RoPE ones by rotating back with the token's position and the
  model's own ``inv_freq`` (docs/PAPERS.md §4 (d) 1: importance is then position-agnostic).
- **LKV-H, the budgets.** Retention fractions ``rho_{l,h}`` whose mean is the target retention
  ``1 - ratio``, each at least ``budget_floor x (1 - ratio)`` (a safeguard like AdaKV's) and at
  most 1: ``rho = f + (mean - f) L H softmax(theta)``, capped at 1 by water-filling.

Inference (this file): at ``end_of_context`` each (row, layer, kv head) keeps its integer budget of
the context (:func:`head_budgets`: the row's total ``L x H_kv x keep_count(n, ratio)`` split by
``rho`` with largest remainders, so the total is exactly the budget function's), sinks and recent
window first, then the highest scores, physically compacted in the ragged store
(:mod:`methods.ragged`). The question and decode tokens are added on top, as for SnapKV and AdaKV
(``evict_in_decode=false``, the LongBench protocol); with ``evict_in_decode=true`` a head over its
budget (context budget + the budget function's share of the new tokens) frees its lowest-score
token outside the sinks and recent window at every step, the new tokens scored when written.

Choices the paper leaves open, and ours (docs/PAPERS.md §4 (b), (d)):
- Budgets are per kv head (the cache is stored per kv head) and task-agnostic: learned once per
  (model, ratio) on synthetic retrieval tasks, ``niah_multikey`` and ``common_words`` held out.
- Training (``scripts/train/lkv.py``): the LLM is frozen; the context is prefilled with the full
  cache (context queries see everything), then the question and answer see a soft keep-mask
  ``m = sigmoid((s - tau) / T)`` on the context, ``tau`` solved so that ``sum(m)`` equals the head's
  budget exactly (implicit gradient to both the scores and the budget, :func:`soft_keep`), ``T``
  annealed from 1 to 0.05, then hard top-k with a straight-through gradient. Loss: KL from the
  full-cache model's next-token distribution on the answer tokens (+ optional CE).
- Ablations (knobs): ``allocation=uniform`` (every head keeps ``keep_count(n, ratio)``) and
  ``scorer=uniform`` (no token preference: a head fills its budget with sinks and the most recent
  tokens, i.e. StreamingLLM at the learned budgets). ``allocation=uniform`` with the learned scorer
  uses the weights trained with uniform budgets (variant ``scorer_only``) when the file has them.
- Weights live in one safetensors file per model (``methods/data/lkv/<model dir name>.safetensors``
  unless ``weights`` names another), keyed by variant and ratio, with the training command, the
  model's shape and a fingerprint of its weights; weights trained for another model are refused.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from methods.api import CalibrationContext, LayerSpec, ModelSpec
from methods.eviction import EvictionMethod
from methods.ragged import ScoreInput
from methods.selectors import _largest_remainder, keep_count, keep_count_t

__all__ = ["LKV", "LKVWeights", "head_fractions", "head_budgets", "soft_keep", "unrotate", "scorer_features",
           "score_tokens", "weights_fingerprint", "default_weights_path", "TRAIN_COMMAND"]

DATA_DIR = Path(__file__).resolve().parent / "data" / "lkv"
TRAIN_COMMAND = "python -m scripts.train.lkv --model {model} --ratios {ratios}"
VARIANTS = ("joint", "scorer_only")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin = f(position x inv_freq) x attention_scaling


# -- shared by training and inference -------------------------------------------------------------
def default_weights_path(model_name: str) -> Path:
    """Where LKV weights for a model live: methods/data/lkv/<last path component>.safetensors."""
    return DATA_DIR / f"{Path(str(model_name).rstrip('/')).name}.safetensors"


def shown(path: Path) -> str:
    """A path as a message shows it: relative to the working directory when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def model_arg(name: str) -> str:
    """How the training command names a model: a local directory relative to here, else the id."""
    return shown(Path(name)) if Path(name).exists() else str(name)


def rope_of(model: Any) -> tuple[Tensor, float]:
    """The model's RoPE ``inv_freq`` (D/2,) and ``attention_scaling``, from its rotary module."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"LKV un-rotates keys with a fixed inv_freq; rope_type {rope_type!r} changes it with "
                         f"the length (supported: {', '.join(ROPE_TYPES)})")
    for mod in model.modules():
        inv = getattr(mod, "inv_freq", None)
        if isinstance(inv, Tensor):
            return inv.detach().float().cpu(), float(getattr(mod, "attention_scaling", 1.0))
    raise ValueError(f"{type(model).__name__} has no rotary embedding module with inv_freq; LKV needs RoPE")


def unrotate(k: Tensor, positions: Tensor, inv_freq: Tensor, scale: float = 1.0) -> Tensor:
    """Pre-RoPE keys from post-RoPE ones: k (..., S, D), positions broadcastable to (..., S).

    transformers' RoPE is k' = a (k cos + rotate_half(k) sin) with a = attention_scaling, so
    k = (k' cos - rotate_half(k') sin) / a."""
    freqs = positions.float()[..., None] * inv_freq.to(k.device)  # (..., S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    kf = k.float()
    half = kf.shape[-1] // 2
    rot = torch.cat([-kf[..., half:], kf[..., :half]], dim=-1)
    return (kf * cos - rot * sin) / float(scale)


def scorer_features(k_pre: Tensor, v: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., D) pre-RoPE keys and values -> (..., 2D + 2): each divided by its RMS, and both log RMS."""
    k_rms = k_pre.float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    v_rms = v.float().pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    return torch.cat([k_pre.float() / k_rms, v.float() / v_rms, k_rms.log(), v_rms.log()], dim=-1)


def score_tokens(feats: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """One layer's scorer: feats (B, H, S, F); w1 (H, F, M), b1 (H, M), w2 (H, M), b2 (H,) -> (B, H, S)."""
    hid = torch.nn.functional.silu(torch.einsum("bhsf,hfm->bhsm", feats, w1) + b1[:, None])
    return torch.einsum("bhsm,hm->bhs", hid, w2) + b2[:, None]


def head_fractions(theta: Tensor, mean: float, floor: float) -> Tensor:
    """Retention fractions (L, H) from logits ``theta`` (L, H): mean exactly ``mean``, each in
    [floor x mean, 1] (differentiable in theta; caps by water-filling)."""
    f = float(floor) * float(mean)
    n = theta.numel()
    w = torch.softmax(theta.flatten().float(), 0)
    capped = torch.zeros(n, dtype=torch.bool, device=theta.device)
    rho = f + (mean - f) * n * w
    for _ in range(n):
        over = (rho > 1.0) & ~capped
        if not bool(over.any()):
            break
        capped |= over
        free = (mean * n - capped.sum() - f * (~capped).sum())  # retention left for the uncapped heads
        share = torch.where(capped, torch.zeros_like(w), w)
        rho = torch.where(capped, torch.ones_like(rho), f + free * share / share.sum().clamp(min=1e-30))
    return rho.view_as(theta)


def head_budgets(n: int, ratio: float, rho: Tensor | None, n_layers: int, n_heads: int) -> list[list[int]]:
    """Integer budgets (L x H) for a row of ``n`` context tokens: they sum to exactly
    ``L x H x keep_count(n, ratio)``; each head gets 1 token first (so none is empty) and the rest is
    split in proportion to ``rho`` (None: uniform) by largest remainder, capped at n. A head's budget
    is thus 1 + (total - L H) rho / sum(rho), within about 1 / (1 - ratio) tokens of the rho x n that
    training used (e.g. 1,548 vs 1,553 for rho = 0.76 at n = 2048, ratio 0.85)."""
    C = keep_count(n, ratio)
    if rho is None or C == 0 or C == n:
        return [[C] * n_heads for _ in range(n_layers)]
    flat = [Fraction(float(x)) for x in rho.detach().flatten().tolist()]
    rest = n_layers * n_heads * C - len(flat)  # one token each first, the rest in proportion to rho
    total = sum(flat)
    out = _largest_remainder([Fraction(rest) * x / total for x in flat], rest, [n - 1] * len(flat))
    return [[1 + out[li * n_heads + h] for h in range(n_heads)] for li in range(n_layers)]


def soft_keep(scores: Tensor, keep: Tensor, valid: Tensor, temp: float, iters: int = 40) -> Tensor:
    """Soft keep-mask m = sigmoid((s - tau) / temp) with sum(m) = ``keep`` over the valid tokens.

    scores (..., S); keep (...) float, how many of the valid tokens to keep; valid (..., S) bool.
    tau is found by bisection without gradient, then written as tau0 + temp (sum(m) - keep) / sum(m')
    so its gradient is the implicit one (d tau / d s_j = m'_j / sum m', d tau / d keep = -temp / sum m')."""
    s = scores.float()
    neg = torch.finfo(torch.float32).max
    with torch.no_grad():
        lo = torch.where(valid, s, torch.full_like(s, neg)).amin(-1) - 30 * temp
        hi = torch.where(valid, s, torch.full_like(s, -neg)).amax(-1) + 30 * temp
        for _ in range(iters):
            mid = (lo + hi) / 2
            tot = (torch.sigmoid((s - mid[..., None]) / temp) * valid).sum(-1)
            lo = torch.where(tot > keep, mid, lo)
            hi = torch.where(tot > keep, hi, mid)
        tau0 = (lo + hi) / 2
    m0 = torch.sigmoid((s - tau0[..., None]) / temp) * valid
    d = (m0 * (1 - m0)).sum(-1).clamp(min=1e-6).detach() / temp
    tau = tau0 + (m0.sum(-1) - keep) / d
    return torch.sigmoid((s - tau[..., None]) / temp) * valid


def weights_fingerprint(model: Any) -> str:
    """A short hash of a model's parameter names, shapes and first values (as float32): different after
    retraining; the same on any device, and across dtypes when the checkpoint is stored in the lower
    precision (a bf16 checkpoint loaded in bf16 on a GPU and in fp32 on a CPU, as the tiny model)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


# -- the weights file -----------------------------------------------------------------------------
@dataclass
class LKVWeights:
    """What one (variant, ratio) entry of a weights file holds, on the CPU."""

    w1: Tensor  # (L, H, F, M)
    b1: Tensor  # (L, H, M)
    w2: Tensor  # (L, H, M)
    b2: Tensor  # (L, H)
    rho: Tensor  # (L, H) retention fractions (mean = 1 - ratio)

    def to(self, device: Any) -> LKVWeights:
        return LKVWeights(*(getattr(self, f).to(device) for f in ("w1", "b1", "w2", "b2", "rho")))


def ratio_key(ratio: float) -> str:
    return f"{float(ratio):g}"


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("lkv", "{}"))


def load_entry(path: Path, variant: str, ratio: float) -> LKVWeights:
    from safetensors.torch import load_file

    t = load_file(str(path))
    pre = f"{variant}/{ratio_key(ratio)}/"
    return LKVWeights(*(t[pre + f] for f in ("w1", "b1", "w2", "b2", "rho")))


def save_weights(path: Path, meta: dict, entries: dict[tuple[str, float], LKVWeights], *, overwrite: bool = False) -> None:
    """Write (or extend) a weights file: entries (variant, ratio) -> weights; meta is the file's
    (``trained`` maps each entry to how it was trained, including ``n_sink`` and ``window``). A file
    holding another model's weights (another fingerprint) is replaced only with ``overwrite``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path)) if path.exists() else {}
    old = read_meta(path) if path.exists() else {}
    if old and old.get("fingerprint") != meta.get("fingerprint"):
        if not overwrite:
            raise ValueError(f"{shown(path)} holds LKV weights of another model (fingerprint {old.get('fingerprint')}, "
                             f"model {old.get('model')!r}); pass --weights <another file>, or --overwrite to replace it")
        tensors, old = {}, {}
    trained = {**old.get("trained", {}), **meta.get("trained", {})}
    for (variant, ratio), w in entries.items():
        for f in ("w1", "b1", "w2", "b2", "rho"):
            tensors[f"{variant}/{ratio_key(ratio)}/{f}"] = getattr(w, f).detach().float().cpu().contiguous()
    entries_now = sorted({k.rsplit("/", 1)[0] for k in tensors})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"lkv": json.dumps({**old, **meta, "trained": trained,
                                                               "entries": entries_now}, sort_keys=True)})


# -- the method -----------------------------------------------------------------------------------
@dataclass
class LKV(EvictionMethod):
    """The LKV method (the module docstring says what it does). Knobs: ``allocation`` (head budgets: learned | uniform), ``scorer``
    (learned | uniform), ``n_sink`` / ``window`` (protected tokens, as trained), ``evict_in_decode``,
    ``weights`` (a file; default methods/data/lkv/<model dir name>.safetensors)."""

    weights: str | None = None
    allocation: str = "learned"
    scorer: str = "learned"
    n_sink: int = 4
    window: int = 32
    evict_in_decode: bool = False

    name: ClassVar[str] = "lkv"
    scores_on_write: ClassVar[bool] = True  # new tokens are scored by the learned scorer when written

    def __post_init__(self) -> None:
        super().__post_init__()
        for knob in ("allocation", "scorer"):
            if getattr(self, knob) not in ("learned", "uniform"):
                raise ValueError(f"{knob} must be learned or uniform, got {getattr(self, knob)!r}")
        self._w: LKVWeights | None = None
        self._rope: tuple[Tensor, float] | None = None
        self._budget_cache: dict[int, list[list[int]]] = {}
        self._calibrated = False

    # -- what is needed, and whether it exists ---------------------------------------------------
    @property
    def needs_weights(self) -> bool:
        return float(self.ratio) > 0 and (self.allocation == "learned" or self.scorer == "learned")

    def variant(self) -> str:
        return "scorer_only" if self.allocation == "uniform" else "joint"

    def weights_path(self, model_name: str) -> Path:
        return Path(self.weights) if self.weights else default_weights_path(model_name)

    def _entry(self, meta: dict) -> tuple[str, bool]:
        """The file's entry this configuration uses: (variant, whether it exists)."""
        have = set(meta.get("entries", []))
        want = f"{self.variant()}/{ratio_key(self.ratio)}"
        if want in have:
            return self.variant(), True
        fallback = f"joint/{ratio_key(self.ratio)}"
        return "joint", fallback in have

    def cache_identity(self, model_name: str) -> str | None:
        """A hash of the weights file this configuration reads (None when it reads none)."""
        path = self.weights_path(model_name)
        if not self.needs_weights or not path.exists():
            return None
        variant, _ = self._entry(read_meta(path))
        return f"{variant}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"

    def validate(self, model: ModelSpec) -> list[str]:
        reasons = super().validate(model)
        if reasons or not self.needs_weights:
            return reasons
        path = self.weights_path(model.name)
        cmd = TRAIN_COMMAND.format(model=model_arg(model.name), ratios=ratio_key(self.ratio))
        if not path.exists():
            return [f"lkv: no trained weights for model {model_arg(model.name)!r} at {shown(path)}; train them with `{cmd}`"]
        meta = read_meta(path)
        shape = {"n_layers": model.n_layers, "n_kv_heads": model.n_kv_heads, "head_dim": model.head_dim}
        if {k: meta.get("spec", {}).get(k) for k in shape} != shape:
            return [f"lkv: the weights in {shown(path)} were trained for model {meta.get('model')!r} "
                    f"({meta.get('spec')}), not {model_arg(model.name)!r} ({shape}); train this model's with `{cmd}`"]
        variant, ok = self._entry(meta)
        if not ok:
            have = ", ".join(sorted(meta.get("entries", []))) or "none"
            return [f"lkv: {shown(path)} has no weights for ratio {self.ratio} (it has: {have}); train them with `{cmd}`"]
        trained = {**meta, **meta.get("trained", {}).get(f"{variant}/{ratio_key(self.ratio)}", {})}
        for knob in ("n_sink", "window"):
            if knob in trained and int(trained[knob]) != int(getattr(self, knob)):
                reasons.append(f"lkv: the weights for ratio {self.ratio} were trained with {knob}={trained[knob]}, "
                               f"not {getattr(self, knob)}; use {knob}={trained[knob]} or train with "
                               f"`{cmd} --{knob.replace('_', '-')} {getattr(self, knob)} --weights <another file>`")
        return reasons

    def calibrate(self, ctx: CalibrationContext) -> None:
        """Load the weights and check they were trained for this model (its weights' fingerprint)."""
        self._rope = rope_of(ctx.model)
        self._w = None
        if not self.needs_weights:
            self._calibrated = True
            return
        path = self.weights_path(ctx.spec.name)
        meta = read_meta(path)
        fp = weights_fingerprint(ctx.model)
        if meta.get("fingerprint") != fp:
            cmd = TRAIN_COMMAND.format(model=model_arg(ctx.spec.name), ratios=ratio_key(self.ratio))
            raise ValueError(f"lkv: the weights in {shown(path)} were trained for model {meta.get('model')!r} with weights "
                             f"fingerprint {meta.get('fingerprint')}; this model's is {fp} (another checkpoint); "
                             f"retrain with `{cmd}`")
        variant, _ = self._entry(meta)
        if variant != self.variant():
            warnings.warn(f"lkv: {shown(path)} has no {self.variant()} weights for ratio {self.ratio}; using the "
                          f"{variant} scorer with {self.allocation} budgets", stacklevel=2)
        self._w = load_entry(path, variant, self.ratio)
        self._budget_cache = {}
        self._calibrated = True

    # -- budgets and scores ----------------------------------------------------------------------
    def _ready(self) -> None:
        if not self._calibrated:
            raise RuntimeError("lkv needs calibrate(ctx) before use (it loads the trained weights and the "
                               "model's RoPE); the harness and scripts/experiments/lkv_length_generalization.py call it")

    def _allocation(self, n: int, L: int, H: int) -> list[list[int]]:
        if n not in self._budget_cache:
            rho = self._w.rho if (self.allocation == "learned" and self._w is not None) else None
            self._budget_cache[n] = head_budgets(n, self.ratio, rho, L, H)
        return self._budget_cache[n]

    def budgets_of(self, layer: LayerSpec, n: Tensor) -> Tensor:
        """(B, H_kv) this layer's integer budgets for rows of ``n`` context tokens."""
        li, L, H = layer.layer_idx, layer.n_layers, layer.n_kv_heads
        rows = [self._allocation(int(x), L, H)[li] if int(x) > 0 else [0] * H for x in n.tolist()]
        return torch.tensor(rows, dtype=torch.long, device=n.device)

    def budgets(self, inp: ScoreInput, scores: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        budget = self.budgets_of(inp.layer, inp.n)
        return budget, self.protect(inp.n, budget, scores.shape[-1])

    def _score(self, layer: LayerSpec, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """(B, H_kv, T) scores of tokens k, v (B, H_kv, T, D) at positions (B, T) or (T,)."""
        self._ready()
        if self.scorer == "uniform" or float(self.ratio) == 0:
            return positions.float().expand(k.shape[0], -1)[:, None].expand(k.shape[:3]).contiguous()
        w = self._w if self._w.w1.device == k.device else self._w.to(k.device)
        self._w = w
        li = layer.layer_idx
        inv, scale = self._rope  # type: ignore[misc]
        if inv.device != k.device:  # once: a decode step captured in a CUDA graph must not copy from the host
            inv = inv.to(k.device)
            self._rope = (inv, scale)
        pos = positions if positions.dim() == 2 else positions[None]
        k_pre = unrotate(k, pos[:, None, :], inv, scale)
        return score_tokens(scorer_features(k_pre, v), w.w1[li], w.b1[li], w.w2[li], w.b2[li])

    def scores(self, inp: ScoreInput) -> Tensor:
        return self._score(inp.layer, inp.keys, inp.values, inp.positions)

    # -- decode-time eviction (knob) -------------------------------------------------------------
    @property
    def keeps_positions(self) -> bool:  # type: ignore[override]
        return bool(self.evict_in_decode)

    @property
    def keeps_scores(self) -> bool:  # type: ignore[override]
        return bool(self.evict_in_decode)

    @property
    def evicts_in_decode(self) -> bool:
        return bool(self.evict_in_decode)

    @property
    def accumulates_attention(self) -> bool:
        return False

    def carried_scores(self, inp: ScoreInput) -> Tensor:
        return self.scores(inp).float()

    def write_scores(self, layer: LayerSpec, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return self._score(layer, k, v, positions).float()

    def uniform_budget(self, inp: ScoreInput) -> Tensor:
        return keep_count_t(inp.n.long(), float(self.ratio))
