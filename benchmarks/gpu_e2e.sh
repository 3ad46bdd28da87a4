#!/usr/bin/env bash
# The end-to-end GPU check: generate data, build features, train through Ray Train on the GPU (NCCL),
# register the model in MLflow, then score a fresh candidate set with GPU actors through Ray Data.
#
# On a GPU machine without Ray, MLflow, polars, TorchRec or FBGEMM (the `device` machines: see
# benchmarks/gpu_pack.sh, which packs them into .whl/part1..3.tar.xz, 105 MiB in all), in two calls, the
# second within the 30 s the machine stays warm after the first, from the repository root there. A call
# carries at most 64 MiB, so part 3 is cut in pieces here (split -b 16M -a 1 .whl/part3.tar.xz
# .whl/part3.tar.xz.): the first call carries part1.tar.xz and part3.tar.xz.a, the second the rest.
#     bash benchmarks/gpu_e2e.sh unpack 1 && bash benchmarks/gpu_e2e.sh keep part3.tar.xz.a \
#         && bash benchmarks/gpu_e2e.sh generate
#     bash benchmarks/gpu_e2e.sh unpack 2 && bash benchmarks/gpu_e2e.sh unpack 3 && bash benchmarks/gpu_e2e.sh run
# `keep` sets a piece aside for the next call; `unpack N` joins part N's pieces (.whl/partN.tar.xz*, and
# those kept) and unpacks them; `generate` starts the data generation (numpy and pyarrow only, which the
# machine has) in its own process session, so that it goes on while the other parts travel; `run` waits.
# A dry run of the same steps on this machine's CPU, small:
#     PY=.venv/bin/python USE_GPU=0 IMPRESSIONS=300000 CANDIDATES=200000 bash benchmarks/gpu_e2e.sh run
#
# Knobs (environment): IMPRESSIONS (26,000,000: a training split of ~20.8M rows), CANDIDATES (20,000,000),
# BATCH (65,536 rows per training step and per scoring model call), USE_GPU (1), PY (python3),
# SCORE2_ARGS (a second scoring run of the same candidates with these pipelines.score options, e.g.
# "--concurrency 4 --threads-per-actor 4"),
# SITE (/tmp/site: where the parts are unpacked), WORK (/tmp/e2e), OUT (results: /tmp/e2e/out).
# Results in OUT: e2e.log (the story of each step, timings), train.log and score.log (library output),
# dmon.log (nvidia-smi dmon: GPU utilization every second), summary.json.
set -uo pipefail
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/e2e}
OUT=${OUT:-$WORK/out}
PY=${PY:-python3}
USE_GPU=${USE_GPU:-1}
IMPRESSIONS=${IMPRESSIONS:-26000000}
CANDIDATES=${CANDIDATES:-20000000}
BATCH=${BATCH:-65536}

KEPT=${KEPT:-/tmp/e2e-pieces}
if [ "${1:-}" = "keep" ]; then
    mkdir -p "$KEPT" && cp ".whl/$2" "$KEPT/" && echo "kept $2 in $KEPT"
    exit $?
fi
if [ "${1:-}" = "unpack" ]; then
    mkdir -p "$SITE" "$KEPT"
    started=$(date +%s)
    pieces=$(cd .whl && ls "part$2.tar.xz"* 2>/dev/null; cd "$KEPT" && ls "part$2.tar.xz"* 2>/dev/null)
    whole="$KEPT/whole$2.tar.xz"
    : >"$whole"
    for piece in $(echo "$pieces" | sort -u); do  # part3.tar.xz.a, .b, ... in order
        if [ -f ".whl/$piece" ]; then cat ".whl/$piece" >>"$whole"; else cat "$KEPT/$piece" >>"$whole"; fi
    done
    if command -v xz >/dev/null; then
        tar -xJf "$whole" -C "$SITE" || exit 1
    else
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$whole" "$SITE" || exit 1
    fi
    rm -f "$whole"
    touch "$SITE/.part$2"
    echo "part $2 unpacked in $(($(date +%s) - started)) s; parts there: $(ls -a "$SITE" | grep -c '^\.part')"
    exit 0
fi
mkdir -p "$WORK" "$OUT"
generate=("$PY" -m pipelines.generate --out "$WORK/raw" --impressions "$IMPRESSIONS" --seed 1 --no-progress
    --log-file "$WORK/generate.log")
if [ "${1:-}" = "generate" ]; then  # in the background, in its own session: it outlives this call
    rm -f "$WORK/generate.rc"
    date +%s%N >"$WORK/generate.start"
    setsid bash -c '"$@" >"$0/generate.out" 2>&1; echo $? >"$0/generate.rc"' "$WORK" "${generate[@]}" \
        </dev/null >/dev/null 2>&1 &
    echo "generating ${IMPRESSIONS} impressions in the background into $WORK/raw"
    exit 0
fi
[ "${1:-}" = "run" ] || { echo "usage: $0 unpack N | generate | run" >&2; exit 2; }

if [ "$USE_GPU" = 1 ]; then
    for k in 1 2 3; do
        [ -f "$SITE/.part$k" ] || { echo "part $k is not in $SITE: unpack it first (machine gone cold?)"; exit 3; }
    done
    export PYTHONPATH="$SITE:$PWD"
    gpu=(--use-gpu)
else
    gpu=()
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/e2e.log"; }
step() {  # step NAME COMMAND...: runs it, logs its wall time; stops the check if it fails
    local name=$1 started status
    shift
    started=$(date +%s%N)
    log "== $name: $*"
    "$@" 2>&1 | tee -a "$OUT/e2e.log"
    status=${PIPESTATUS[0]}
    log "== $name: exit $status after $((($(date +%s%N) - started) / 1000000)) ms"
    echo "$name $started $(date +%s%N) $status" >>"$OUT/steps.txt"
    [ "$status" = 0 ] || { log "stopped: $name failed"; exit "$status"; }
}
: >"$OUT/steps.txt"
"$PY" - <<'EOF' 2>&1 | grep -v -i warn | tee -a "$OUT/e2e.log"
import os, torch, ray, mlflow, polars, torchrec, fbgemm_gpu
from benchmarks.measure import cpu_model
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"{gpu} | {os.cpu_count()} CPUs ({cpu_model()}) | torch {torch.__version__} | fbgemm_gpu {fbgemm_gpu.__version__} | "
      f"torchrec {torchrec.__version__} | ray {ray.__version__} | mlflow {mlflow.__version__} | "
      f"polars {polars.__version__}")
EOF
if [ "$USE_GPU" = 1 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/e2e.log"
    nvidia-smi dmon -s u -o T -d 1 >"$OUT/dmon.log" 2>&1 &
    dmon=$!
    trap 'kill $dmon 2>/dev/null' EXIT
fi

if [ -f "$WORK/generate.start" ]; then  # started in the background by `generate`
    log "== generate: waiting for the background generation"
    while [ ! -f "$WORK/generate.rc" ]; do sleep 1; done
    tee -a "$OUT/e2e.log" <"$WORK/generate.out"
    status=$(cat "$WORK/generate.rc")
    echo "generate $(cat "$WORK/generate.start") $(stat -c %Y "$WORK/generate.rc")000000000 $status" >>"$OUT/steps.txt"
    [ "$status" = 0 ] || { log "stopped: generate failed"; exit "$status"; }
else
    step generate "${generate[@]}"
fi
# The candidates to score are generated meanwhile, on one core of the host, in the background.
candidates_start=$(date +%s%N)
"$PY" -c "import sys; from pathlib import Path; from synth.candidates import generate_candidates
print(generate_candidates(Path(sys.argv[1]), int(sys.argv[2]), 2, progress=False))" \
    "$WORK/cands" "$CANDIDATES" >"$WORK/candidates.out" 2>&1 &
candidates=$!
step features "$PY" -m pipelines.features build --config ecommerce --data "$WORK/raw" \
    --out "$WORK/features" --overwrite
# The demo's model and settings; one worker per GPU, large batches, rates scaled for them, one epoch.
cat >"$WORK/train_gpu.yaml" <<EOF
features: $WORK/features
truth: $WORK/raw/truth.parquet
model: ecommerce_mmoe
training:
  epochs: 1
  batch_size: $BATCH
  dense_lr: 0.01
  embedding_optimizer: rowwise_adagrad
  embedding_lr: 0.1
  sharding: table_wise
  log_every_steps: 50
  main_metric: click/auc
run:
  experiment: recsys-gpu-e2e
  model_name: ecommerce-ranker
  num_workers: 1
  cpus_per_worker: 8
  storage_path: $WORK/ray
EOF
step train "$PY" -m pipelines.train --config "$WORK/train_gpu.yaml" "${gpu[@]}" \
    --tracking-uri "sqlite:///$WORK/mlflow.db" --log-file "$OUT/train.log"
log "== candidates: waiting for the background generation"
wait "$candidates"
status=$?
tee -a "$OUT/e2e.log" <"$WORK/candidates.out"
echo "candidates $candidates_start $(date +%s%N) $status" >>"$OUT/steps.txt"
[ "$status" = 0 ] || { log "stopped: candidates failed"; exit "$status"; }
step score "$PY" -m pipelines.score --model models:/ecommerce-ranker@champion \
    --input "$WORK/cands/impressions.parquet" --history "$WORK/cands/history.parquet" \
    --output "$WORK/scores" "${gpu[@]}" --batch-size "$BATCH" --tracking-uri "sqlite:///$WORK/mlflow.db" \
    --overwrite --no-progress --log-file "$OUT/score.log"
scores=("$WORK/scores")
if [ -n "${SCORE2_ARGS:-}" ]; then  # the same candidates again, with other scoring settings
    # shellcheck disable=SC2086
    step score2 "$PY" -m pipelines.score --model models:/ecommerce-ranker@champion \
        --input "$WORK/cands/impressions.parquet" --history "$WORK/cands/history.parquet" \
        --output "$WORK/scores2" "${gpu[@]}" --batch-size "$BATCH" --tracking-uri "sqlite:///$WORK/mlflow.db" \
        --overwrite --no-progress --log-file "$WORK/score2.log" $SCORE2_ARGS
    scores+=("$WORK/scores2")
fi
[ -n "${dmon:-}" ] && kill "$dmon" 2>/dev/null
"$PY" -m benchmarks.gpu_e2e_summary "$OUT" "${scores[@]}" | tee -a "$OUT/e2e.log"
