"""The small kernels of a fused decode step (:mod:`harness.fused_decoder`), each beside its plain-torch
reference. Between the GEMMs of a Llama-style layer, the Hugging Face modules launch some thirty small
kernels per token (RMSNorm in five pieces, RoPE in eight, SiLU, multiply, residual adds, a scatter per
K and V); at batch 1 their launches and gaps cost as much as reading the layer's weights. These fuse them
into four (the fourth, the K/V append, belongs to the store: :func:`methods.kernels.append.append_decode`):

- :func:`add_rmsnorm`: the residual add and the RMSNorm that follows it, one program per row;
- :func:`rope_`: rotary embedding of every query and key head in place (rotate-half convention);
- :func:`silu_mul`: SwiGLU's ``silu(gate) * up`` from the fused gate-up projection's output;
- :func:`gemv` / :func:`linear`: the projections of a few rows, each program streaming a slice of the
  weight once (at one row faster than cuBLAS's GEMM kernels, and without their split-K reductions).

Each rounds to the model's dtype where the eager modules round (every bf16 op stores a bf16 result), so a
fused step gives the module path's numbers; the references are written as the modules compute them and
the tests compare the kernels with them on CPU (``TRITON_INTERPRET=1``) and on the GPU.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from methods.kernels import interpret_mode, interpreter_compat

# --------------------------------------------------------------------------------------------------
# References (what the Hugging Face Llama modules compute)


def add_rmsnorm_reference(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, delta (B, N) -> (x + delta, RMSNorm(x + delta)) in x's dtype (LlamaRMSNorm's arithmetic)."""
    if delta is not None:
        x = x + delta
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return x, weight * y.to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, D); cos, sin (B, D) -> x * cos + rotate_half(x) * sin (transformers' apply_rotary_pos_emb)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def silu_mul_reference(gu: Tensor) -> Tensor:
    """gu (B, 2N) = [gate | up] -> silu(gate) * up (B, N)."""
    gate, up = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# --------------------------------------------------------------------------------------------------
# Launchers


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from harness.kernels import _layers_triton as K

    return K


def _launch(**options: int) -> dict[str, int]:
    return {} if interpret_mode() else options


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _rows(t: Tensor, name: str) -> None:
    if t.dim() != 2 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be (B, N) with unit stride along N, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}")


def add_rmsnorm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float, out: Tensor | None = None) -> Tensor:
    """Fused :func:`add_rmsnorm_reference`: ``x`` (B, N) becomes ``x + delta`` in place (when ``delta``
    is given); returns the normalised rows (B, N) (``out`` if given)."""
    _rows(x, "x")
    B, N = x.shape
    out = torch.empty_like(x) if out is None else out
    if delta is not None:
        _rows(delta, "delta")
    d = delta if delta is not None else x
    block = _pow2(N)
    _kernels().add_rmsnorm[(B,)](
        x, d, weight, out, N, float(eps), x.stride(0), d.stride(0), out.stride(0),
        HAS_DELTA=delta is not None, BLOCK=block, **_launch(num_warps=max(4, min(16, block // 512))),
    )
    return out


def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Fused :func:`rope_reference`, in place: x (B, H, D) with unit stride along D (a view into the fused
    QKV projection's output: query and key heads side by side); cos, sin (B, D)."""
    B, H, D = x.shape
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or D % 2 or _pow2(D // 2) != D // 2:
        raise ValueError(f"rope_ needs unit stride along D and D/2 a power of two, got D={D}")
    _kernels().rope_inplace[(B, H)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                                    HALF=D // 2, **_launch(num_warps=1))
    return x


SILU_BLOCK = 512


def silu_mul(gu: Tensor, out: Tensor | None = None) -> Tensor:
    """Fused :func:`silu_mul_reference`: gu (B, 2N) -> (B, N)."""
    _rows(gu, "gu")
    B, N2 = gu.shape
    N = N2 // 2
    out = torch.empty(B, N, dtype=gu.dtype, device=gu.device) if out is None else out
    _kernels().silu_mul[(B, -(-N // SILU_BLOCK))](gu, out, N, gu.stride(0), out.stride(0), BLOCK=SILU_BLOCK,
                                                   **_launch(num_warps=4))
    return out


def gemv_config(rows: int, K: int, *, itemsize: int = 2, smem: int | None = None) -> dict | None:
    """The :func:`gemv` configuration for ``rows`` x ``K`` inputs, or None where cuBLAS is as fast (more than 8
    rows). Chosen with ``python scripts/bench_gemv.py`` on an H200 at the Llama-3.1-8B shapes (projections
    of 4096 and 14336 inputs), where it beats cuBLAS by 3-15 % at one row and by up to 11 % at eight
    (results/bench/2026-11-29-h200-gemv.md): one row on the CUDA cores (no tensor-core padding), K > 8192
    and batches through ``tl.dot``. ``smem`` (bytes of shared memory a program may use; None: no limit, the
    interpreter) shrinks the pipeline, then the tile, until the stages of ``itemsize``-byte tiles fit: a GPU
    with less shared memory than the H200 gets a shallower pipeline, not a launch failure."""
    if rows > 8:
        return None
    if K > 8192:
        cfg = {"block_n": 32, "block_k": 512, "num_warps": 4, "num_stages": 4, "use_dot": True}
    elif rows == 1:
        cfg = {"block_n": 16, "block_k": 512, "num_warps": 8, "num_stages": 3, "use_dot": False}
    else:
        cfg = {"block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 4, "use_dot": True}
    while smem is not None and _gemv_smem(cfg, itemsize) > smem:
        if cfg["num_stages"] > 2:
            cfg["num_stages"] -= 1
        elif cfg["block_k"] > 64:
            cfg["block_k"] //= 2
        else:
            return None
    return cfg


def _gemv_smem(cfg: dict, itemsize: int) -> int:
    """Shared memory of a gemv configuration's pipeline as Triton 3.6 allocates it: num_stages - 1 buffered
    copies of the weight tile (and of the rows' tile, padded to 16, for tl.dot); e.g. block_n 64, block_k 512,
    4 stages, tl.dot, bf16: 245,760 bytes, which the H200 (232,448 per block) refused in scripts/bench_gemv.py."""
    rows = 16 if cfg["use_dot"] else 0
    return (cfg["num_stages"] - 1) * (cfg["block_n"] + rows) * cfg["block_k"] * itemsize


@functools.cache
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 49152))


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear`` of a decode step's few rows: :func:`gemv` where :func:`gemv_config` has a
    configuration (and the rows are contiguous), cuBLAS otherwise (and for fp32 on the GPU, whose tiles the
    configurations, sized for bf16/fp16 weights, would not fit in shared memory)."""
    cuda = x.device.type == "cuda"
    smem = _smem_limit(x.device.index if x.device.index is not None else torch.cuda.current_device()) if cuda else None
    cfg = gemv_config(x.shape[0], x.shape[1], itemsize=w.element_size(), smem=smem) if x.dim() == 2 else None
    fp32_gpu = x.dtype == torch.float32 and cuda  # cuBLAS: the tiles were tuned for 2-byte weights
    if cfg is None or fp32_gpu or x.stride(-1) != 1 or w.stride(-1) != 1:
        return torch.nn.functional.linear(x, w, bias)
    return gemv(x, w, bias, **cfg)


def gemv(x: Tensor, w: Tensor, bias: Tensor | None = None, *, block_n: int = 16, block_k: int = 512,
         num_warps: int = 8, num_stages: int = 3, use_dot: bool | None = None) -> Tensor:
    """``torch.nn.functional.linear(x, w, bias)`` for a few rows (x (B, K), B <= 16; w (N, K)) as one Triton
    kernel in which each program streams BLOCK_N rows of the weight once, accumulating in fp32. ``use_dot``
    (default: more than one row, or fp16/bf16) multiplies on the tensor cores, the rows padded to 16;
    without it (one row only) on the CUDA cores."""
    _rows(x, "x")
    _rows(w, "w")
    B, K = x.shape
    N = w.shape[0]
    if B > 16:
        raise ValueError(f"gemv serves at most 16 rows, got {B}; use torch.nn.functional.linear")
    use_dot = B > 1 if use_dot is None else use_dot
    if not use_dot and B != 1:
        raise ValueError("use_dot=False serves one row")
    y = torch.empty(B, N, dtype=x.dtype, device=x.device)
    _kernels().gemv[(-(-N // block_n),)](
        x, w, bias if bias is not None else w, y, N, K, B, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_B=max(16, _pow2(B)), BLOCK_N=block_n, BLOCK_K=block_k,
        USE_DOT=use_dot, IEEE=x.dtype == torch.float32, **_launch(num_warps=num_warps, num_stages=num_stages),
    )
    return y
