"""Kernels of the model's layers (not of a method): the fused decode step's RMSNorm, RoPE, SwiGLU and GEMV
(:mod:`harness.kernels.layers`), used by :mod:`harness.fused_decoder`. The stores' kernels (K/V append,
attention over their layouts) live in :mod:`methods.kernels`, whose availability checks these share.
Nothing here is imported at package import time."""
