"""Decode-speed benchmark on the GPU machine: kvbench ``full`` against the Hugging Face engines (docs/ARCHITECTURE.md §7).

    python -m scripts.bench                                   # every cell, every engine (several GPU calls' worth)
    python -m scripts.bench --engines kvbench,hf_eager --cells 1x32768,8x32768
    python -m scripts.bench --report                          # merge the rows of this commit into the report only
    python -m scripts.bench --smoke                           # seconds, on CPU: a tiny random Llama (tests)
    python -m scripts.bench --methods full,fp8:0.5,uniform_int:0.75 --cells 8x32768,1x32768   # methods side by side

Model ``llama3_8b_shape`` (Llama-3.1-8B's config, random bf16 weights), cells batch x context. Engines, in
one process with the model loaded once:
- ``kvbench``: ``method=full`` through :class:`harness.engine.Engine`, i.e. the runner's throughput probe
  (:func:`harness.measure.throughput_probe`): chunked prefill of random tokens, then greedy decode; on CUDA
  the fused kernels and the CUDA-graph decode step of :mod:`harness.fused_decoder` (rows say which attention
  kernel and which layers ran). ``kvbench_modules`` (not in the default list) is the same with the decode step
  through the Hugging Face modules (``fused_layers=off``): what the fused layers are worth.
- ``hf_eager``: ``model(...)`` with a ``DynamicCache``, SDPA attention, eager decode loop.
- ``hf_static_compile``: ``StaticCache`` + ``torch.compile(mode="reduce-overhead", fullgraph=True)`` of the
  decode forward (compiled once per cell, the compile not timed).
Every engine prefills the same random tokens with flash-style kernels (kvbench's own, SDPA for HF) in chunks of
``--prefill-tokens`` / batch tokens per row and asks for no context logits; only the decode steps are compared. Per cell and engine: decode ms/token p50
and p90 (CUDA events around each step, after ``--warmup`` untimed steps), tokens/s, prefill tokens/s, peak
memory of the prefill and of the decode, and ``roofline_ms`` = (weight bytes read per step, the input
embedding table excluded unless tied, + KV bytes read per step, each KV head once, at the cell's context)
/ bandwidth, the bandwidth measured in the same process by a device-to-device copy of 4 GiB;
``roofline_frac`` = roofline_ms / decode p50. Cells whose KV alone exceeds the device are listed as
skipped with the figure. ``--capacity`` adds the largest batch of kvbench ``full`` that decodes within an
80 GB budget at 32K (what an H100-80GB user gets), found with random K/V (no prefill) under
``torch.cuda.set_per_process_memory_fraction``. ``--profile N`` adds, per cell, where a kvbench decode step's
time goes: torch.profiler over N steps, kernel time per step by category (attention, GEMM, norm, KV write,
elementwise, other) and the top kernels; the place to start when ``roofline_frac`` is low.

``--methods name[:ratio[:key=value...]],...`` (any conf/method name, built from its YAML without Hydra, validated,
calibrated on random tokens when it fits something, the fit timed as ``calibrate_ms``): one kvbench row per method
and ratio per cell, carrying ``method``, ``ratio`` and ``label``, with ``kv_bytes_read_per_step`` (what the store
says one decode step reads), the method's own roofline ((weights read + KV read) / bandwidth) and, in the report,
decode ms as a multiple of ``full``'s in the same call (put ``full`` first in the list) and issue 20's targets.
``--calibrate specs`` times those methods' calibration first (RateQuant's fit; rows of kind ``calibration``).

Rows go to ``results/bench/rows/<device>-<commit>.jsonl`` (appended: several calls at one commit merge)
and the report to ``results/bench/<device>-<date>-<commit>.md`` (commit, command, the three engines side by
side per cell). Imports neither lm-eval, wandb nor Hydra.

Modules: ``common`` (cells, byte accounting, timers), ``method_spec`` (``--methods`` specs built from
conf/method without Hydra), ``engines`` (one cell per engine, the capacity probe), ``profiling`` (``--profile``),
``report`` (the markdown report and its targets) and ``cli`` (the flags, the rows file, the loop over cells).
"""
