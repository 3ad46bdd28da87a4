#!/usr/bin/env bash
# Runs `python -m pipelines.benchmark --use-gpu` on a GPU machine whose python3 has a CUDA build of torch
# but neither TorchRec nor fbgemm-gpu, and no package index (the `device` machines of this workplace).
#
# What travels, in .whl/ (built on the development machine, see benchmarks/fatbin_prune.py):
#   fb_min.tar.xz         fbgemm-gpu 1.6.0 (torch 2.11, CUDA 13) pruned to sm_90: 51 MB instead of 465
#   torchrec-1.6.1-py312-none-any.whl, tensordict-0.15.3, pyvers-0.2.3, iopath-0.1.9 (pure Python)
# Everything else (torch, numpy, pyarrow, pyyaml, psutil, pynvml) is the machine's own.
#
# Usage, from the repository root there:  bash benchmarks/gpu_device_run.sh [benchmark options]
#                                      or  bash benchmarks/gpu_device_run.sh profile [profile options]
# Output: $OUT/gpu_benchmark.log (the table), $OUT/benchmark_gpu.json, $OUT/dmon.log (nvidia-smi dmon);
# with `profile`, benchmarks/gpu_step_profile.py's summary lines, and its tables in $OUT/profile.log.
set -uo pipefail
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
RESULTS=${OUT:-/tmp/gpu-benchmark}
mkdir -p "$SITE" "$RESULTS"
started=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHL"/*.whl || exit 1
if command -v xz >/dev/null; then
    tar -xJf "$WHL/fb_min.tar.xz" -C "$SITE" || exit 1
else
    python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$WHL/fb_min.tar.xz" "$SITE" || exit 1
fi
echo "installed in $(($(date +%s) - started)) s"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, '| fbgemm_gpu', fbgemm_gpu.__version__, '| torchrec', torchrec.__version__, '| cuda', torch.cuda.is_available())" 2>&1 | grep -v -i warn
if [ "${1:-}" = "profile" ]; then
    shift
    timeout "${BENCH_TIMEOUT:-420}" python3 -m benchmarks.gpu_step_profile "$@" >"$RESULTS/profile.log" 2>&1
    status=$?
    grep -E "^===|Error|error" "$RESULTS/profile.log"
    echo "profile exit status $status after $(($(date +%s) - started)) s"
    exit "$status"
fi
nvidia-smi dmon -s u -d 1 >"$RESULTS/dmon.log" 2>&1 &
dmon=$!
timeout "${BENCH_TIMEOUT:-420}" python3 -m pipelines.benchmark --use-gpu --out "$RESULTS" "$@" >"$RESULTS/full.log" 2>&1
status=$?
kill "$dmon" 2>/dev/null
# The table without TorchRec's planner warnings (full.log keeps everything).
grep -v -E "WARNING|Warning|warnings.warn|is_fx_tracing|^\s*$" "$RESULTS/full.log" | tee "$RESULTS/gpu_benchmark.log"
echo "benchmark exit status $status after $(($(date +%s) - started)) s"
exit "$status"
