#!/usr/bin/env bash
# Packs what the end-to-end GPU check (benchmarks/gpu_e2e.sh) needs on a GPU machine that has a CUDA build
# of torch but no Ray, MLflow, polars, TorchRec or FBGEMM, and no package index (the `device` machines of
# this workplace: Python 3.12, torch 2.11 + CUDA 13, an H100/H200; a call carries at most 64 MiB).
#
# Output: .whl/part1.tar.xz, part2.tar.xz, part3.tar.xz, each under 60 MiB, to be unpacked into one
# folder there (gpu_e2e.sh unpack N), one call each, and .whl/manifest.txt (what each part holds).
#   part1  fbgemm-gpu 1.6.0 (the release for torch 2.11, CUDA 13), pruned by benchmarks/fatbin_prune.py
#          to sm_90 and to the TBE kernels training uses: 465 MB of wheel -> ~45 MB
#   part2  Ray 2.60.0 without Java, RLlib, Serve's tests, the dashboard's web client and symbols
#          (79 MB of wheel -> ~20 MB); TorchRec 1.6.1 and its pure-Python needs
#   part3  polars 2.1.0 (symbols stripped), mlflow-skinny 3.17.2 with SQLAlchemy and Alembic, and the rest
#          of what those need and the machine lacks (pydantic, jsonschema, opentelemetry, ...)
# What the machine has is not carried: torch, numpy, pyarrow, pandas, grpcio, protobuf, aiohttp, pyyaml,
# requests, click, msgpack, psutil, cloudpickle, ... (/work/.library/device/KINDS.md lists them).
#
# Usage, from the repository root here:  bash benchmarks/gpu_pack.sh     (about 10 minutes on 2 cores)
set -euo pipefail
DEST=${DEST:-.whl}
WORK=${WORK:-/tmp/gpu-pack}
PY=${PY:-.venv/bin/python}
WHEELS=(
    fbgemm-gpu==1.6.0 torchrec==1.6.1 tensordict==0.15.3 pyvers==0.2.3 iopath==0.1.9
    ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1 tensorboardx==2.6.5
    polars==2.1.0 polars-runtime-32==2.1.0
    mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 cachetools==7.3.3
    databricks-sdk==0.162.0 google-auth==2.63.0 pyasn1-modules==0.4.2 pyasn1==0.6.5 cryptography==50.0.2
    cffi==2.1.1 pycparser==3.12 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 gitpython==3.2.1
    gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0 opentelemetry-api==1.45.2
    opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    python-dotenv==1.2.4 sqlparse==0.6.1 orjson==3.13.0 tzdata==2026.6
)
mkdir -p "$WORK/wheels" "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WORK/wheels" "${WHEELS[@]}" 2>&1 |
    grep -v "is ignored" || true

rm -rf "$WORK/site" "$WORK/fb" && mkdir -p "$WORK/site" "$WORK/fb"
for wheel in "$WORK"/wheels/*.whl; do
    case "$(basename "$wheel")" in
        fbgemm_gpu-*) unzip -q -o "$wheel" -d "$WORK/fb" ;;
        *) unzip -q -o "$wheel" -d "$WORK/site" ;;
    esac
done

# Ray: what a single-node run of Ray Train, Ray Data and Ray Core uses.
ray=$WORK/site/ray
rm -rf "$ray/jars" "$ray/rllib" "$ray/llm" "$ray/dashboard/client/build"
find "$ray" -name "*.map" -delete
find "$ray" -name tests -type d -prune -exec rm -rf {} +
strip --strip-unneeded "$ray/_raylet.so"
strip "$ray/core/src/ray/gcs/gcs_server" "$ray/core/src/ray/raylet/raylet"
strip --strip-unneeded "$WORK"/site/_polars_runtime_32/*.so

# FBGEMM: sm_90 only; the libraries and the optimizers' backward kernels training does not launch emptied.
"$PY" -m benchmarks.fatbin_prune --keep 90 --drop vbe gwd inference backward_dense \
    --drop-optimizers adagrad lamb lars_sgd partial_rowwise_adam partial_rowwise_lamb \
    rowwise_adagrad_with_counter -- "$WORK"/fb/fbgemm_gpu/*.so >"$WORK/prune.log"

pack() {  # pack NAME DIR ENTRIES...: DEST/NAME.tar.xz of ENTRIES (globs) of DIR
    local name=$1 dir=$2
    shift 2
    (cd "$dir" && tar -cf - $@) | xz -9 -T2 >"$DEST/$name.tar.xz"
    echo "$name: $(du -m "$DEST/$name.tar.xz" | cut -f1) MiB: $*" | tee -a "$DEST/manifest.txt"
}
: >"$DEST/manifest.txt"
pack part1 "$WORK/fb" "fbgemm_gpu fbgemm_gpu-*.dist-info"
pack part2 "$WORK/site" "ray ray-*.dist-info torchrec* tensordict* pyvers* iopath*"
rest=$(cd "$WORK/site" && ls -d * | grep -v -E "^(ray|torchrec|tensordict|pyvers|iopath)" | tr '\n' ' ')
pack part3 "$WORK/site" "$rest"
