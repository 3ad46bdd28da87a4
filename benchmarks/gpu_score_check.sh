#!/usr/bin/env bash
# Scoring on a GPU shared by many actors, with and without NVIDIA's Multi-Process Service (MPS): does the
# time-slicing of 16 CUDA contexts on one GPU bound `pipelines.score --use-gpu`? Random-weight demo model
# (benchmarks/score_bench.py `prepare`), ROWS candidates (10,000,000).
# On a device machine, after the parts are unpacked as in benchmarks/gpu_e2e.sh (unpack 1, 2 and 3):
#     bash benchmarks/gpu_score_check.sh
set -uo pipefail
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/score-check}
OUT=${OUT:-$WORK/out}
ROWS=${ROWS:-10000000}
mkdir -p "$WORK" "$OUT"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
started=$(date +%s)
python3 -c "import sys; from pathlib import Path; from benchmarks.score_bench import prepare
prepare(Path(sys.argv[1]), int(sys.argv[2]), 17)" "$WORK" "$ROWS" 2>&1 | grep -v -i -E "warn|fbgemm|compat|^\s*$|\[0m"
echo "prepared $ROWS candidates and a package in $(($(date +%s) - started)) s"
score() {  # score NAME [pipelines.score options]: one run, its end-to-end and steady rates
    local name=$1
    shift
    python3 -m pipelines.score --model "$WORK/model" --input "$WORK/impressions.parquet" \
        --history "$WORK/history.parquet" --output "$WORK/$name" --use-gpu --batch-size 65536 \
        --tracking-uri "sqlite:///$WORK/mlflow.db" --overwrite --no-progress --log-file "$OUT/$name.log" "$@" 2>&1 |
        grep -E "scored with|Error"
    python3 -c "import sys; from pathlib import Path; from benchmarks.gpu_e2e_summary import steady_scoring
print(sys.argv[1], 'steady', steady_scoring(Path(sys.argv[2])))" "$name" "$WORK/$name"
}
nvidia-smi dmon -s u -o T -d 1 >"$OUT/dmon.log" 2>&1 &
dmon=$!
score gpu16
if nvidia-cuda-mps-control -d; then
    echo "MPS started"
    score gpu16_mps
    score gpu4x4_mps --concurrency 4 --threads-per-actor 4
    echo quit | nvidia-cuda-mps-control
else
    echo "no MPS on this machine"
fi
kill "$dmon" 2>/dev/null
