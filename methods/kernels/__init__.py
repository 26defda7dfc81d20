"""Fused kernels (Triton) for the stores' fast paths, each beside the plain-torch reference it is tested
against (docs/ARCHITECTURE.md §7). Nothing here is imported at package import time and Triton is optional: without it,
or on a CPU without ``TRITON_INTERPRET=1``, :func:`fused_available` is False and stores use the reference
path."""

from __future__ import annotations

import functools
import os
from typing import Any


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no fused path
        return False
    return True


def interpret_mode() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors, slowly (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


FUSED_CHOICES = ("auto", "on", "off")  # a method's ``fused`` field


def use_fused(choice: str, device: Any, unsupported: str | None = None) -> bool:
    """A method's ``fused`` field -> whether its store takes the fused path on ``device``.

    ``auto``: on CUDA where the kernels run and the layer is supported (``unsupported`` is None);
    ``on``: wherever they can run (CPU: under the interpreter), else an error saying why; ``off``: never."""
    import torch

    if choice == "off":
        return False
    if choice == "auto":
        return torch.device(device).type == "cuda" and unsupported is None and fused_available(device)
    if choice != "on":
        raise ValueError(f"fused must be one of {FUSED_CHOICES}, got {choice!r}")
    if unsupported:
        raise ValueError(f"fused=on, but the fused kernels cannot serve this layer: {unsupported}; use fused=auto")
    if not fused_available(device):
        raise ValueError(
            f"fused=on, but the fused kernels cannot run on {device}: they need CUDA and Triton, or (CPU, "
            "tests) Triton with TRITON_INTERPRET=1 set before Triton is imported; use fused=auto or off")
    return True


def fused_available(device: Any) -> bool:
    """Whether the fused kernels can run on ``device``: CUDA with Triton, or any device under the
    interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    import torch

    dev = torch.device(device)
    if not _triton_importable():
        return False
    if interpret_mode():
        return dev.type == "cpu"
    return dev.type == "cuda" and torch.cuda.is_available()


@functools.cache
def interpreter_compat() -> None:
    """Make Triton's CPU interpreter run dynamic-bound loops (``range(lo, hi, step)`` with tensor bounds)
    under numpy >= 2.4: the interpreter (3.6) converts a scalar, which it holds as a 1-element array,
    with ``int(array)``, an error since numpy 2.4. The patch converts through ``.item()`` inside the
    interpreter's own patch scope (restored after each launch); compiled kernels are untouched."""
    import triton.runtime.interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kvbench_compat", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._kvbench_compat = True  # type: ignore[attr-defined]
    interp._patch_lang_tensor = patched
