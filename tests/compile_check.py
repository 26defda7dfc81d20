"""Compile the quantized-cache kernels for an NVIDIA GPU on a machine that has none, and report what fails.

Triton's interpreter (how the CPU tests run the kernels) accepts programs its compiler refuses: a ``return``
inside a compile-time ``if`` ends the function in the interpreter and not in the compiler (KVBENCH_UNPACK=direct
never compiled until a1826fb, and no CPU test saw it). This runs each launcher of the scalar (uniform_int, quarot,
fp8, ratequant), KIVI and TurboQuant kernels on small CPU tensors with Triton's front end and NVIDIA back end
pointed at a GPU target (``--arch``, default 90: the H100): every ``@triton.jit`` launch is compiled down to a
cubin (Triton ships ptxas) and not run, so the outputs are meaningless and only compilation is checked. It cannot
see what a compiled kernel computes (that is ``pytest -m gpu``).

    python -m tests.compile_check [--arch 90] [--quick]      # prints one JSON line: {"compiled": n, "errors": [...]}
    python -m tests.compile_check --quick --sass             # and each decode loop's SASS instruction count

Run in its own process, without ``TRITON_INTERPRET`` (Triton reads it at import); tests/test_kernels.py does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch


def compile_only(arch: int, keep: list | None = None) -> list[str]:
    """Point Triton at a CUDA target of compute capability ``arch`` with no device, and make every launch a
    compile (``warmup``); returns the list the names of compiled kernels are appended to (and ``keep``, when
    given, gets (name, compiled kernel) pairs: its ``asm`` holds the PTX and the cubin)."""
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class NoDevice:
        """The driver calls a launch makes before it compiles (device, stream, target); nothing else."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(NoDevice())
    compiled: list[str] = []
    run = jit.JITFunction.run

    def compile_launch(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}")
        if keep is not None:
            keep.append((compiled[-1], kernel))
        return kernel

    jit.JITFunction.run = compile_launch
    return compiled


def _scalar_cases(quick: bool):
    import methods.kernels.quant_attention as QA
    from methods.kernels.quant_attention import ScalarLayout, scalar_encode_reference
    from tests.test_quant_kernels import GPU_LAYOUTS

    layouts = [(ScalarLayout("int", 2, 32), ScalarLayout("int", 2, 32)),
               (ScalarLayout("int", 4, 32), ScalarLayout("int", 4, 32))] if quick else GPU_LAYOUTS
    dtypes = (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)
    for lk0, lv0 in layouts:
        for D, G in ((64, 3), (128, 4)):
            lk, lv = (ScalarLayout(x.fmt, x.bits, min(x.group, D), x.clip) for x in (lk0, lv0))  # as the GPU test
            if lk.reason(D) or lv.reason(D):  # a layout the stores would not hand to the kernels
                continue
            for dtype in dtypes:
                name = f"scalar k{lk.bits}g{lk.group}{lk.fmt} v{lv.bits} D{D} {str(dtype)[6:]}"

                def case(lk=lk, lv=lv, D=D, G=G, dtype=dtype):
                    B, H, S = 2, 2, 96
                    k, v = torch.randn(2, B, H, S, D).to(dtype)
                    kf, vf = (scalar_encode_reference(x, lay, meta_dtype=dtype) for x, lay in ((k, lk), (v, lv)))
                    f = lambda d: (d["codes"], d["scale"], d.get("zero"))  # noqa: E731
                    heads = torch.arange(H, dtype=torch.int32)
                    QA.scalar_dequant(f(kf), heads, torch.empty(B, H, S, D, dtype=dtype), n_slots=S, layout=lk)
                    q = torch.randn(B, H * G, D).to(dtype)
                    kn, vn = torch.randn(2, B, H, D).to(dtype)
                    QA.scalar_decode_attention(q, *f(kf), *f(vf), torch.tensor([S, 33]), kn, vn, k_layout=lk,
                                               v_layout=lv, scaling=D**-0.5)
                    QA.scalar_append(k[:, :, :8], v[:, :, :8], f(kf), f(vf), heads, k_layout=lk, v_layout=lv, start=0)
                    QA.scalar_append(kn[:, :, None], vn[:, :, None], f(kf), f(vf), heads, k_layout=lk, v_layout=lv,
                                     lengths=torch.tensor([40, 33]))

                yield name, case


def _kivi_cases(quick: bool):
    from methods.kernels.kivi_attention import kivi_append, kivi_decode_attention
    from tests.test_kivi_kernels import FIELDS, _fields

    for bits in ([(2, 2), (4, 4)] if quick else [(2, 2), (4, 4), (3, 3), (8, 8), (2, 3)]):
        for D, Gq in ((64, 3), (128, 4)):
            for dtype in ((torch.bfloat16,) if quick else (torch.float32, torch.bfloat16)):
                def case(bits=bits, D=D, Gq=Gq, dtype=dtype):
                    B, H, G, R, S = 2, 2, 32, 128, 512
                    f = _fields(bits, B, H, D, G, R, S, dtype=dtype)
                    q = torch.randn(B, H * Gq, D).to(dtype)
                    kn, vn = torch.randn(2, B, H, D).to(dtype)
                    kw = dict(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_length=R)
                    kivi_decode_attention(q, *(f[n] for n in FIELDS), torch.tensor([S - 7, 77]), kn, vn,
                                          scaling=D**-0.5, **kw)
                    kivi_append(kn, vn, f, torch.tensor([255, 77]), torch.tensor([True, True]), **kw)

                yield f"kivi k{bits[0]}v{bits[1]} D{D} {str(dtype)[6:]}", case


def _turboquant_cases(quick: bool):
    from methods.kernels.turboquant_attention import turboquant_decode_attention, turboquant_prefill
    from tests.test_turboquant_kernels import _codecs, _stored

    specs = [((2, 0), (1, 128), True), ((4, 0), (4, 0), True)]
    if not quick:
        specs += [((4, 0), (3, 128), True), ((3, 128), (3, 128), True)]
    for spec in specs:
        for D, Gq in ((64, 3), (128, 4)):
            dtype = torch.bfloat16

            def case(spec=spec, D=D, Gq=Gq, dtype=dtype):
                B, H, S, T, start = 2, 2, 96, 16, 40
                kc, vc = _codecs(spec, D, dtype=dtype)
                kf, vf = _stored(kc, vc, B, H, S, D, dtype=dtype)
                q = torch.randn(B, H * Gq, D).to(dtype)
                kn, vn = torch.randn(2, B, H, D).to(dtype)
                turboquant_decode_attention(q, kf, vf, torch.tensor([S, 33]), kn, vn, k_codec=kc, v_codec=vc,
                                            scaling=D**-0.5)
                qq = torch.randn(B, H * Gq, T, D).to(dtype)
                k, v = torch.randn(2, B, H, T, D).to(dtype)
                turboquant_prefill(qq, k, v, kf, vf, torch.tensor([S, 33]), start=start, k_codec=kc, v_codec=vc,
                                   scaling=D**-0.5)

            yield f"turboquant {spec} D{D} bf16", case


def loop_sass(cubin: bytes) -> tuple[int, dict[str, int]]:
    """(instructions, count by opcode) of the longest loop (backward branch) of a cubin's SASS, as Triton's bundled
    ``nvdisasm`` prints it: for a decode kernel, the instructions every thread issues per tile. The quantized
    kernels are issue-bound (H100, e9d3ab8: INT4 at 0.3 of copy bandwidth whatever its width), so this count,
    taken on a machine without a GPU, tracks their time: the CPU side of a kernel change, before a GPU call."""
    import collections
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        lines = subprocess.run([str(tool), "-c", f.name], capture_output=True, text=True, check=True).stdout.split("\n")
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line.strip()))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
    if not loops:
        return 0, {}
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    ops = collections.Counter(m.group(2).split(".")[0] for line in lines[lo:hi + 1]
                              if (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)))
    return sum(ops.values()), dict(ops.most_common())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100, 80: A100)")
    ap.add_argument("--quick", action="store_true", help="2- and 4-bit layouts in bf16 only (the default suite)")
    ap.add_argument("--sass", action="store_true",
                    help="also print, per case, the SASS instructions of each decode_split kernel's loop (loop_sass)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_check: unset TRITON_INTERPRET (it makes Triton interpret instead of compile)")
    keep: list = []
    compiled = compile_only(args.arch, keep)
    errors = []
    for cases in (_scalar_cases, _kivi_cases, _turboquant_cases):
        for name, case in cases(args.quick):
            kept = len(keep)
            try:
                case()
            except Exception as e:  # noqa: BLE001 - every case is reported, the first failure stops nothing
                last = traceback.format_exception_only(type(e), e)[-1].strip()
                errors.append(f"{name}: {type(e).__name__}: {str(e).strip()[:600] or last}")
            if args.sass:
                for kname, kernel in keep[kept:]:
                    if kname.endswith("decode_split") or kname.endswith("decode_split_planar"):
                        n, ops = loop_sass(kernel.asm["cubin"])
                        top = ", ".join(f"{k} {v}" for k, v in list(ops.items())[:8])
                        print(f"{name:32s} {kname:42s} loop SASS {n:5d}  ({top})", flush=True)
    # kernels whose PTX holds the bf16 fast conversion (KVBENCH_FAST16=1: its byte permute under 0x43)
    fast16 = sorted({name for name, kernel in keep if "0x43434343" in kernel.asm.get("ptx", "")})
    print(json.dumps({"arch": args.arch, "compiled": len(compiled), "kernels": sorted(set(compiled)),
                      "fast16": fast16, "errors": errors}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
