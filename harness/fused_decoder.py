"""The engine's fused decode step for Llama-style decoders (docs/ARCHITECTURE.md §7: a strong full-cache baseline).

One decode token per row through every layer, with the model's own weights and the run's stores, in
ten kernels per layer (for ``full``) instead of the Hugging Face modules' forty or so:

    add_rmsnorm -> QKV GEMV -> rope_ (q and k heads, in place) -> store.extend (append, attention split,
    combine) -> o GEMV -> add_rmsnorm -> gate-up GEMV -> silu_mul -> down GEMV -> (next layer's add_rmsnorm)

- The q/k/v projections and the gate/up projections each become one GEMV: their weights are
  concatenated once and the modules' parameters re-pointed at views of the concatenation, so the
  memory is not doubled and the module path (prefill, scoring) reads the same tensors.
- Up to 8 rows, the projections and the LM head run :func:`harness.kernels.layers.gemv` (one Triton
  kernel streaming the weight once; 3-15 % faster than cuBLAS at one row on the H200 and no split-K
  reduction kernel); more rows go to cuBLAS.
- RMSNorm with the residual add before it, RoPE of every query and key head, and SwiGLU's
  ``silu(gate) * up`` are single Triton kernels (:mod:`harness.kernels.layers`) that round to the
  model's dtype where the modules round, so the step computes the module path's numbers (tests: greedy
  tokens equal, logits to 1e-4 in fp32).
- Attention is the store's business, as on the module path: ``layer.extend(q, k, v, ...)`` with q, k
  and v as views into the QKV output (B, heads, 1, D); every method's store works unchanged.
- cos/sin come from the model's own rotary module once per step (RoPE scaling variants included).

It serves decode steps only (T = 1, ``Engine._decode_step``: captured in a CUDA graph when the stores
are graph safe); prefill and scoring stay on the module path. Families: ``FAMILIES`` (pre-norm
RMSNorm, rotate-half RoPE, SwiGLU, optional q/k/v biases); anything else (q/k norms, soft-capping,
embedding scale, parallel blocks) takes the module path, with the reason in ``Engine.fused_layers_reason``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

FAMILIES = ("llama", "mistral", "qwen2")  # config.model_type whose decoder layer is exactly the above
CHOICES = ("auto", "on", "off")


def reasons(model: Any) -> list[str]:
    """Why the fused step cannot run ``model`` ([] = it can). Structural, from the config and modules."""
    cfg = model.config
    out: list[str] = []
    if getattr(cfg, "model_type", None) not in FAMILIES:
        out.append(f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {FAMILIES}")
        return out
    if getattr(cfg, "hidden_act", "silu") != "silu":
        out.append(f"hidden_act {cfg.hidden_act!r} is not silu")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        out.append("pretraining_tp > 1 splits the projections")
    dtype = next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        out.append(f"weights in {dtype}; the kernels compute float32, bfloat16 and float16")
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        out.append("the output embedding is not a Linear layer")
    dec = model.get_decoder()
    for name in ("embed_tokens", "rotary_emb", "norm", "layers"):
        if not hasattr(dec, name):
            out.append(f"the decoder has no {name}")
    if out:
        return out
    from methods.kernels.attention import HEAD_DIMS

    for i, layer in enumerate(dec.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        need = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            (mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        missing = [n for m, n in need if not isinstance(getattr(m, n, None), torch.nn.Linear)]
        missing += [n for n in ("input_layernorm", "post_attention_layernorm")
                    if not hasattr(getattr(layer, n, None), "variance_epsilon")]
        if missing:
            out.append(f"layer {i} lacks {missing}")
            break
        extra = [n for n in ("q_norm", "k_norm") if getattr(attn, n, None) is not None]
        if extra:
            out.append(f"layer {i} has {extra}, which the fused step does not apply")
            break
        biases = [attn.q_proj.bias is None, attn.k_proj.bias is None, attn.v_proj.bias is None]
        if len(set(biases)) > 1:
            out.append(f"layer {i}: q/k/v projections mix biases and none")
            break
        if attn.head_dim not in HEAD_DIMS:
            out.append(f"head_dim {attn.head_dim} is not one of {HEAD_DIMS}")
            break
    return out


def _fuse(linears: list[torch.nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate the weights (and biases) of ``linears`` along the output dimension and re-point each
    module's parameter at its slice (same values; the separate tensors are freed)."""
    w = torch.cat([m.weight.data for m in linears], dim=0)
    b = None if linears[0].bias is None else torch.cat([m.bias.data for m in linears], dim=0)
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = w[row : row + n]
        if b is not None:
            m.bias.data = b[row : row + n]
        row += n
    return w, b


class _Layer:
    def __init__(self, layer: Any):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp
        self.wqkv, self.bqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.wgu, self.bgu = _fuse([mlp.gate_proj, mlp.up_proj])
        self.n_q = attn.q_proj.weight.shape[0]
        self.n_kv = attn.k_proj.weight.shape[0]
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.norm_in, self.norm_post = layer.input_layernorm, layer.post_attention_layernorm

    def intact(self) -> bool:
        """The modules still point at the fused tensors (not moved, reloaded or re-assigned since)."""
        return (self.attn.q_proj.weight.data_ptr() == self.wqkv.data_ptr()
                and self.mlp.gate_proj.weight.data_ptr() == self.wgu.data_ptr()
                and self.attn.q_proj.weight.device == self.wqkv.device)


class FusedDecoder:
    """The fused decode step of one model (build with :func:`for_model`, which caches it on the model)."""

    def __init__(self, model: Any):
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.layers = [_Layer(layer) for layer in self.decoder.layers]
        self.checked: str | None = None  # the self-test's verdict on CUDA: None = not run, "" = passed, else why not
        # device=split: layers on several devices, each layer's kernels on its own (see forward)
        self.multi_device = len({L.wqkv.device for L in self.layers} | {self.lm_head.weight.device}) > 1

    def intact(self) -> bool:
        return all(layer.intact() for layer in self.layers)

    @torch.inference_mode()
    def selftest(self) -> None:
        """Run each kernel once at this model's shapes, with 1 and 2 rows, against torch. Raises if one cannot
        launch on this GPU (shared memory, compiler) or computes something else, so the engine can keep the
        module path rather than fail a run mid-decode."""
        firsts: dict = {}  # the first layer on each device (device=split: kernels compile per device)
        for L in self.layers:
            firsts.setdefault(L.wqkv.device, L)
        for L0 in firsts.values():
            with _on(L0.wqkv.device):
                self._selftest(L0, with_head=L0.wqkv.device == self.lm_head.weight.device)
        if self.lm_head.weight.device not in firsts:
            with _on(self.lm_head.weight.device):
                self._selftest(None, with_head=True)

    def _selftest(self, L0: _Layer | None, *, with_head: bool) -> None:
        from harness.kernels.layers import add_rmsnorm, linear, rope_, silu_mul

        w0 = L0.wqkv if L0 is not None else self.lm_head.weight
        dev, dt = w0.device, w0.dtype
        g = torch.Generator(device=dev).manual_seed(0)
        mats = {} if L0 is None else {
            "qkv": (L0.wqkv, L0.bqkv), "o_proj": (L0.attn.o_proj.weight, L0.attn.o_proj.bias),
            "gate_up": (L0.wgu, L0.bgu), "down_proj": (L0.mlp.down_proj.weight, L0.mlp.down_proj.bias)}
        if with_head:
            mats["lm_head"] = (self.lm_head.weight, self.lm_head.bias)
        for rows in (1, 2):
            for name, (w, b) in mats.items():
                x = torch.randn(rows, w.shape[1], generator=g, device=dev, dtype=dt)
                got, want = linear(x, w, b).float(), torch.nn.functional.linear(x, w, b).float()
                tol = 2e-2 * float(want.abs().max()) + 1e-3
                if not bool(((got - want).abs() <= tol).all()):
                    raise RuntimeError(f"gemv of {name} ({rows} rows) differs from torch by "
                                       f"{float((got - want).abs().max()):.3g}")
            if L0 is None:
                continue
            x = torch.randn(rows, L0.wqkv.shape[1], generator=g, device=dev, dtype=dt)
            add_rmsnorm(x.clone(), x, L0.norm_in.weight, L0.norm_in.variance_epsilon)
            heads = torch.randn(rows, (L0.n_q + L0.n_kv) // L0.head_dim, L0.head_dim, generator=g, device=dev, dtype=dt)
            rope_(heads, heads[:, 0].clone(), heads[:, 0].clone())
            silu_mul(torch.randn(rows, L0.wgu.shape[0], generator=g, device=dev, dtype=dt))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def forward(self, state: Any, ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        """One decode token per row: ids, positions (B, 1) int64, valid (B, 1) bool -> logits (B, V) fp32.
        Same contract as ``Engine.forward(..., logits_at=zeros)`` for T = 1.

        device=split (layers on several GPUs): each layer's kernels run on its layer's GPU, made the current
        device there (Triton launches on the current device); the residual stream (B, hidden) moves when the
        next layer sits on the next GPU, positions, validity and RoPE's cos/sin once per device; the logits
        come back on the input's device."""
        if not self.multi_device:
            return self._forward(state, ids, positions, valid)
        prev = torch.cuda.current_device() if ids.device.type == "cuda" else None
        try:
            return self._forward(state, ids, positions, valid).to(ids.device)
        finally:
            if prev is not None:
                torch.cuda.set_device(prev)

    def _forward(self, state: Any, ids: Tensor, positions: Tensor, valid: Tensor) -> Tensor:
        from harness.kernels.layers import add_rmsnorm, linear, rope_, silu_mul

        state.positions, state.valid = positions, valid
        B = ids.shape[0]
        x = self.decoder.embed_tokens(ids[:, 0])  # (B, hidden): the residual stream, updated in place
        cos, sin = self.decoder.rotary_emb(x[:, None], position_ids=positions)  # (B, 1, D) each
        cos, sin = cos[:, 0], sin[:, 0]  # (B, D) views: rope_ needs unit stride along D only
        multi, pos, val = self.multi_device, positions, valid
        inputs = {x.device: (cos, sin, positions.to(x.device), valid.to(x.device))} if multi else {}
        first = self.layers[0].norm_in
        if multi:
            x = _move(x, first.weight.device)
        h = add_rmsnorm(x, None, first.weight, first.variance_epsilon)
        for i, L in enumerate(self.layers):
            D, nq, nkv = L.head_dim, L.n_q, L.n_kv
            if multi:  # this layer's GPU: its copy of the step's inputs (made once per device)
                if x.device not in inputs:
                    inputs[x.device] = tuple(t.to(x.device) for t in next(iter(inputs.values())))
                cos, sin, pos, val = inputs[x.device]
            qkv = linear(h, L.wqkv, L.bqkv)  # (B, nq + 2 nkv)
            rope_(qkv[:, : nq + nkv].view(B, (nq + nkv) // D, D), cos, sin)
            q = qkv[:, :nq].view(B, nq // D, 1, D)
            k = qkv[:, nq : nq + nkv].view(B, nkv // D, 1, D)
            v = qkv[:, nq + nkv :].view(B, nkv // D, 1, D)
            state.attention_calls += 1
            o = state.layers[i].extend(q, k, v, positions=pos, valid=val, scaling=L.scaling)  # (B, 1, H, D)
            o_proj, down = L.attn.o_proj, L.mlp.down_proj
            o = linear(o.reshape(B, nq), o_proj.weight, o_proj.bias)
            h = add_rmsnorm(x, o, L.norm_post.weight, L.norm_post.variance_epsilon)
            a = silu_mul(linear(h, L.wgu, L.bgu))
            d = linear(a, down.weight, down.bias)
            nxt = self.layers[i + 1].norm_in if i + 1 < len(self.layers) else self.decoder.norm
            if multi and nxt.weight.device != x.device:  # the next layer lives on the next GPU: (B, hidden) moves
                x, d = _move(x, nxt.weight.device), d.to(nxt.weight.device)
            h = add_rmsnorm(x, d, nxt.weight, nxt.variance_epsilon)
        if multi:
            h = _move(h, self.lm_head.weight.device)
        return linear(h, self.lm_head.weight, self.lm_head.bias).float()


def _move(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``, made the current CUDA device (kernels launch there): device=split only."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return t.to(device)


def _on(device: torch.device) -> Any:
    """A context with ``device`` current on CUDA (nothing elsewhere)."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def for_model(model: Any) -> FusedDecoder:
    """The model's fused decoder, built on first use and rebuilt if its weights moved since. Fusing re-points
    q/k/v and gate/up at views of one tensor each: to ``save_pretrained`` such a model afterwards, clone those
    parameters first (safetensors refuses tensors that share memory without being tied)."""
    fd = model.__dict__.get("_kvbench_fused_decoder")
    if fd is None or not fd.intact():
        fd = FusedDecoder(model)
        model.__dict__["_kvbench_fused_decoder"] = fd
    return fd


def choose(model: Any, choice: str, device: Any) -> tuple[FusedDecoder | None, str | None]:
    """``Engine.fused_layers`` -> (the fused decoder or None, why not). ``auto``: on CUDA where the model's
    family is supported; ``on``: wherever the kernels run (CPU: under ``TRITON_INTERPRET=1``), else an
    error; ``off``: never."""
    from methods.kernels import fused_available

    if choice not in CHOICES:
        raise ValueError(f"fused_layers must be one of {CHOICES}, got {choice!r}")
    if choice == "off":
        return None, "fused_layers=off"
    why = reasons(model)
    dev = torch.device(device)
    if not fused_available(dev):
        why.append(f"the fused kernels cannot run on {dev} (they need CUDA and Triton, or TRITON_INTERPRET=1 on CPU)")
    elif choice == "auto" and dev.type != "cuda":
        why.append("fused_layers=auto takes the fused step on CUDA only")
    if not why:
        fd = for_model(model)
        if dev.type == "cuda" and fd.checked is None:
            try:
                fd.selftest()
                fd.checked = ""
            except Exception as e:  # noqa: BLE001 - any failure: this GPU keeps the module path, with the reason
                fd.checked = f"the fused step's self-test failed on this GPU ({type(e).__name__}: {str(e)[:200]})"
        if fd.checked:
            why.append(fd.checked)
    if why:
        if choice == "on":
            raise ValueError(f"fused_layers=on, but: {'; '.join(why)}; use fused_layers=auto or off")
        return None, "; ".join(why)
    return fd, None
