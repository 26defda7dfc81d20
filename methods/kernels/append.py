"""A decode step's K/V append into a dense slot store (:class:`methods.stores.FusedDenseStore`), beside its
plain-torch reference: the new K/V written at slot ``lengths[b]`` and the row's ``lengths`` / ``seen``
advanced, in one program per row (no scatter index, no separate adds, no host synchronisation). The tests
compare the kernel with the reference on CPU (``TRITON_INTERPRET=1``) and on the GPU."""

from __future__ import annotations

import torch
from torch import Tensor

from . import interpret_mode, interpreter_compat


def append_decode_reference(k: Tensor, v: Tensor, K: Tensor, V: Tensor, lengths: Tensor, seen: Tensor,
                            valid: Tensor) -> None:
    """k, v (B, H_kv, D) to slot lengths[b] of K, V (B, H_kv, S, D); lengths, seen += valid. In place."""
    b = torch.arange(k.shape[0], device=k.device)
    K[b, :, lengths] = k.to(K.dtype)
    V[b, :, lengths] = v.to(V.dtype)
    lengths.add_(valid.long())
    seen.add_(valid.long())


def _kernels():
    if interpret_mode():
        interpreter_compat()
    from . import _append_triton as K

    return K


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def append_decode(k: Tensor, v: Tensor, K: Tensor, V: Tensor, lengths: Tensor, seen: Tensor, valid: Tensor) -> None:
    """Fused :func:`append_decode_reference`: k, v (B, H_kv, D) (any strides); K, V (B, H_kv, S, D);
    lengths, seen (B,) int64; valid (B,) bool. No host synchronisation (CUDA-graph safe)."""
    B, H_kv, D = k.shape
    _kernels().append_decode[(B,)](
        k, v, K, V, lengths, seen, valid, H_kv, valid.stride(0), *k.stride(), *v.stride(), *K.stride(), *V.stride(),
        BLOCK_H=_pow2(H_kv), D=D, **({} if interpret_mode() else {"num_warps": 4}),
    )
