#!/usr/bin/env bash
# The one prepared benchmark run (SD v1 and SDXL) for a lent NVIDIA H100/H200, about 9 minutes in all. From the
# repo root:
#
#   OUT=bench-out bash bench/run_gpu.sh    # -> $OUT/run.log (environment first), summary.md, one JSON per run
#
# It prints the GPU and versions, installs what is missing, runs the CUDA-only tests (pytest -m cuda: the CUDA
# graph step and train.py --cuda_graph against eager), then the full-size benchmark six times, in this order:
#   eager             SD v1.5, all workloads, batches 1,8,32 (the baselines are measured here)
#   graph             our training step captured in a CUDA graph (train.py --cuda_graph), batches 1,8,32
#   compile_sampling  our sampler with torch.compile
#   ckpt              our training step with gradient checkpointing, batches 1,32 (memory)
#   sdxl              SDXL base at 1024 px (--size full-sdxl), bf16: numerics, diffusers' and our training step at
#                     batches 1,4, DDIM 50 + CFG sampling of 2 images and their decode, each side on its own
#                     baselines (estimated 2 minutes, not yet measured: see the comment at its line)
#   compile           our SD v1 training step with torch.compile, batch 32, with the time that is left
# The SD v1 runs after eager reuse its baselines (--baselines_from), so each JSON and table has its ratios.
# Each run has its own time limit; one that does not fit in what is left is skipped and says so. The bench writes
# its JSON after every measurement, so a run stopped by its limit still leaves what it measured.
# BENCH_ONLY="sdxl" (names from the list above, space-separated) runs only those, e.g. to rerun one that failed.
#
# Offline GPU machines (no package index): fetch the missing pure-Python wheels here first with
#   bash bench/run_gpu.sh --fetch-wheels        # -> .whl/ (diffusers, open_clip_torch)
# and send .whl along with the working tree (ignored folders must be named in the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${WHEELS:-.whl}"
if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # Pure-Python wheels, pinned as in requirements*.txt; torch, transformers and the rest come with the GPU image.
    spec() { grep -hiE "^$1(==|>=)" requirements.txt requirements-dev.txt | head -n1; }
    python3 -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "$(spec diffusers)" "$(spec open_clip_torch)"
    ls -l "$WHEELS"
    exit 0
fi

OUT="${OUT:-./bench-out}"
BUDGET_S="${BENCH_BUDGET_S:-540}"  # the whole script, installs included (device call: timeout_s=590)
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[run_gpu +$(elapsed)s] $*"; }

{
    echo "== nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed"
    echo "== python"
    "$PY" -c 'import sys; print(sys.version, sys.executable)'
} 2>&1 | tee "$OUT/run.log"

# --- install what is missing (never replace a working CUDA torch) ---
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "diffusers": "diffusers", "requests": "requests", "matplotlib": "matplotlib", "transformers": "transformers", "open_clip": "open_clip_torch",
        "regex": "regex", "yaml": "pyyaml", "safetensors": "safetensors", "tqdm": "tqdm", "PIL": "pillow"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$missing" ]]; then
    log "missing: $missing"
    if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
        # Offline: the wheels fetched with --fetch-wheels, into a side folder (the image's site-packages stays).
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/apl-site "$WHEELS"/*.whl \
            || log "installing the carried wheels failed; going on with what the image has"
        export PYTHONPATH="/tmp/apl-site${PYTHONPATH:+:$PYTHONPATH}"
    elif [[ " $missing " == *" torch "* ]]; then
        "$PY" -m pip install -q --retries 0 --timeout 10 -r requirements-dev.txt || log "pip install failed"
    else
        # Only the missing packages, at the versions the requirements pin; the image's CUDA torch is kept.
        specs=()
        for pkg in $missing; do
            specs+=("$(grep -hiE "^${pkg}(==|>=|$)" requirements.txt requirements-dev.txt | head -n1 || echo "$pkg")")
        done
        "$PY" -m pip install -q --retries 0 --timeout 10 "${specs[@]}" \
            || log "pip install failed (offline? fetch wheels with --fetch-wheels and carry .whl)"
    fi
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$OUT/run.log"
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"{p.multi_processor_count} SMs")
for name in ("diffusers", "diffusers.loaders.single_file_utils", "transformers", "triton", "numpy", "matplotlib"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "importable"))
    except Exception as e:  # a missing dependency of it shows here, before any bench run needs it
        print(name, "NOT importable:", type(e).__name__, e)
EOF
# BENCH_SIZE_ARGS="--size tiny --device cpu" REQUIRE_GPU=0 gives a CPU dry run of this script's own logic.
SIZE_ARGS="${BENCH_SIZE_ARGS:---size full --device cuda}"
# The SDXL run's sizes: the same with --size tiny -> tiny-sdxl, full -> full-sdxl (or BENCH_SDXL_SIZE_ARGS).
SDXL_SIZE_ARGS="${BENCH_SDXL_SIZE_ARGS:-}"
if [[ -z "$SDXL_SIZE_ARGS" ]]; then
    SDXL_SIZE_ARGS=$(sed -E 's/--size (tiny|full)( |$)/--size \1-sdxl\2/' <<<"$SIZE_ARGS")
fi
if [[ "${REQUIRE_GPU:-1}" == 1 ]]; then
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible: run_gpu.sh is for the lent GPU machine")'
fi

# --- benchmark runs: name, time limit (s), minimum time needed to start (s), bench arguments ---
# All output goes to $OUT/run.log (the device tool brings back at most 8 files: run.log, summary.md, 6 JSON).
bench() {
    local name=$1 limit=$2 need=$3
    shift 3
    if [[ -n "${BENCH_ONLY:-}" && " $BENCH_ONLY " != *" $name "* ]]; then
        return 0
    fi
    local left=$(( BUDGET_S - $(elapsed) ))
    if (( left < need )); then
        log "SKIPPED $name: ${left}s left of the ${BUDGET_S}s budget, it needs about ${need}s" | tee -a "$OUT/run.log"
        return 0
    fi
    (( limit > left )) && limit=$left
    log "run $name (limit ${limit}s): bench/bench.py $SIZE_ARGS $*" | tee -a "$OUT/run.log"
    set +e
    # shellcheck disable=SC2086  # SIZE_ARGS is several words
    timeout --signal=INT --kill-after=20 "$limit" "$PY" bench/bench.py $SIZE_ARGS \
        --out "$OUT/$name.json" "$@" 2>&1 | tee -a "$OUT/run.log"
    local rc=${PIPESTATUS[0]}
    set -e
    case $rc in
        0) log "$name done" ;;
        124|130|137) log "$name STOPPED at its ${limit}s limit: $OUT/$name.json holds what it measured" ;;
        2) log "$name refused its arguments or setup (exit 2; the message is just above)" ;;
        *) log "$name exited with $rc (errors are listed in $OUT/$name.json)" ;;
    esac | tee -a "$OUT/run.log"
}

# Later runs take the baselines (original_style, diffusers_bf16, diffusers sampling) from the eager run's JSON.
reuse() { [[ -s "$OUT/eager.json" ]] && echo "--baselines_from $OUT/eager.json" || true; }
# A run of the SDXL sizes (bench() reads SIZE_ARGS, here this function's own).
bench_sdxl() {
    local SIZE_ARGS=$SDXL_SIZE_ARGS
    bench "$@"
}

# CUDA-only tests first (the captured training step and train.py --cuda_graph must equal eager): 150 s at most.
if [[ -z "${BENCH_SKIP_TESTS:-}" ]]; then
    log "pytest -m cuda" | tee -a "$OUT/run.log"
    set +e
    timeout --kill-after=10 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_step.py \
        tests/test_train.py 2>&1 | tail -n 200 | tee -a "$OUT/run.log"
    log "pytest -m cuda exited with ${PIPESTATUS[0]}" | tee -a "$OUT/run.log"
    set -e
fi
bench eager 200 120 --batches 1,8,32
# The CUDA graph step: capture takes seconds, so all three batch sizes.
# shellcheck disable=SC2046  # reuse prints nothing or two words
bench graph 100 50 --batches 1,8,32 --cuda_graph --skip baselines,numerics,sampling $(reuse)
# Compiled sampling: one graph (batch 2 x sample_batch, no grad), about a minute.
# shellcheck disable=SC2046
bench compile_sampling 150 90 --compile --skip train,numerics,decode,sampling_diffusers $(reuse)
# Gradient checkpointing (memory), short.
# shellcheck disable=SC2046
bench ckpt 80 50 --batches 1,32 --grad_ckpt --skip baselines,numerics,sampling $(reuse)
# SDXL base, 1024 px, bf16, with its own baselines (the SD v1 ones do not apply). What it costs, estimated for an
# H100 from FLOP counts (nothing measured yet): ~15 s for the random weights (3.5e9 parameters, 14 GB fp32 kept on
# the host), ~20 s numerics (at 512 px), ~20 s per training side (2 warm-up + 5 timed steps at batches 1 and 4; a
# 1024 px SDXL sample is several times the UNet work of a 512 px SD v1 one), ~25 s per sampling side (a warm-up and
# a timed call of 50 steps x 2 images x CFG, then the decode): about 2 minutes. The 180 s limit leaves room; the
# compile run below gets what is left. Batch 4's grad pass holds tens of GiB of activations; should it run out of
# memory, the error goes into sdxl.json and the run goes on with sampling.
bench_sdxl sdxl 180 120 --batches 1,4
# Compiled training at batch 32 (the throughput target; batch 1 is the CUDA graph's), with what time is left.
# shellcheck disable=SC2046
bench compile 330 120 --batches 32 --compile --skip baselines,numerics,sampling $(reuse)

# Every run's table in one file.
sed -n '/^APL benchmark:/,/^results:/p' "$OUT/run.log" >"$OUT/summary.md"
log "finished; tables in $OUT/summary.md, everything in $OUT/run.log"
