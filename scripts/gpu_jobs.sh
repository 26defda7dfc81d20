#!/usr/bin/env bash
# One GPU-machine call, several jobs in priority order, each under its own time cap; everything lands in $OUT
# (at most 8 files come back a call, so each job writes one or two). From the repo root on the GPU machine, with
# `.whl` in carry and the commit's sha written out (DEVELOPERS.md, "Running on the GPU machine"):
#
#     export KVBENCH_GIT_SHA=<sha> KVBENCH_GIT_DIRTY=0; bash scripts/gpu_jobs.sh diag tests:300 leaderboard:4
#
# Jobs (NAME or NAME:<seconds or minutes>):
#   diag            fused_divergence of the stores whose GPU tests part (uniform_int and kivi at 2 bits), with the
#                   default unpacking and KVBENCH_UNPACK=direct -> $OUT/diag.tar.gz (JSON + log per run)
#   tests[:S]       pytest -m gpu, cut at S seconds (default 520) -> $OUT/pytest.log, $OUT/failures.txt
#   leaderboard[:M] the tiny model's grid, 4 workers, new cells for M minutes (default 8) -> $OUT/rows.tar.gz
#   bench[:S]       planar INT4 decode tuned beside the default at 8 x 32768, then the per-method report
#                   -> $OUT/bench.tar.gz
# A job that fails or runs out of time does not stop the next; $OUT/jobs.log says what each did and how long.
set -u
[ -n "${OUT:-}" ] || { echo "gpu_jobs.sh: \$OUT is not set (run it through the device tool)" >&2; exit 2; }
[ -n "${KVBENCH_GIT_SHA:-}" ] || { echo "gpu_jobs.sh: export KVBENCH_GIT_SHA=<sha of the commit sent> first" >&2; exit 2; }
. scripts/gpu_env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/jobs.log"

log() { echo "[gpu_jobs $(date +%H:%M:%S)] $*" | tee -a "$OUT/jobs.log"; }

diag() {
    local d=/tmp/diag; mkdir -p $d
    for mode in tree direct; do
        KVBENCH_UNPACK=$mode timeout 150 python -m scripts.experiments.fused_divergence uniform_int --ratio 0.875 \
            --variants default nograph '{"num_stages": 1}' --out $d/int2-$mode.json >/dev/null 2>$d/int2-$mode.log
        log "diag uniform_int 0.875 ($mode): rc=$?"; tail -n 25 $d/int2-$mode.log | tee -a "$OUT/jobs.log"
        KVBENCH_UNPACK=$mode timeout 150 python -m scripts.experiments.fused_divergence kivi --ratio 0.875 --new 40 \
            --variants default nograph --out $d/kivi2-$mode.json >/dev/null 2>$d/kivi2-$mode.log
        log "diag kivi 0.875 ($mode): rc=$?"; tail -n 25 $d/kivi2-$mode.log | tee -a "$OUT/jobs.log"
    done
    tar -czf "$OUT/diag.tar.gz" -C $d .
}

tests() {
    KVBENCH_FAILURES="$OUT/failures.txt" timeout "${1:-520}" python -m pytest -m gpu -p no:cacheprovider -v \
        --tb=short tests >"$OUT/pytest.log" 2>&1
    log "pytest -m gpu: rc=$? ($(grep -cE ' PASSED' "$OUT/pytest.log") passed, $(grep -cE ' FAILED| ERROR' "$OUT/pytest.log") failed)"
    grep -E " FAILED| ERROR|passed|failed" "$OUT/pytest.log" | tail -n 20 | tee -a "$OUT/jobs.log"
}

leaderboard() {
    timeout $(( ${1:-8} * 60 + 90 )) python -m scripts.leaderboard --models tiny --workers 4 --max-minutes "${1:-8}" \
        --pack "$OUT/rows.tar.gz" 2>"$OUT/leaderboard.log" | tail -n 1 | tee -a "$OUT/jobs.log"
    log "leaderboard: rc=${PIPESTATUS[0]}"
}

bench() {
    local d=/tmp/bench; mkdir -p $d
    timeout "${1:-300}" python -m scripts.bench_quant_attention --cells 8x32768 --tune \
        --tune-layouts "uniform_int4 g32" --best $d/best.json >$d/tune.log 2>&1
    log "bench tune: rc=$?"; tail -n 15 $d/tune.log | tee -a "$OUT/jobs.log"
    tar -czf "$OUT/bench.tar.gz" -C $d .
}

for job in "$@"; do
    name=${job%%:*}; arg=; [ "$name" != "$job" ] && arg=${job#*:}
    case $name in
        diag|tests|leaderboard|bench) ;;
        *) log "unknown job '$name' (diag, tests[:S], leaderboard[:M], bench[:S])"; continue ;;
    esac
    t0=$(date +%s); log "start $job"
    $name $arg
    log "end $job after $(( $(date +%s) - t0 )) s"
done
