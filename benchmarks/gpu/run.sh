#!/usr/bin/env bash
# One-shot GPU benchmark (issue 24): whoever holds a GPU runs this first and commits what it writes.
#
#   OUT=/some/dir bash benchmarks/gpu/run.sh            # real run: CUDA, medsr-cxr-x4, under 8 min on one H100
#   OUT=/tmp/x bash benchmarks/gpu/run.sh --dry-run     # same steps on the CPU with the tiny model, seconds (CI)
#
# Installs nothing from the internet. Python packages missing on the GPU machine (pydicom, pylibjpeg, ...) can
# be carried as wheels in $WHEELS (default: .whl in the repo root), installed with --no-index into a private
# target. Every step has its own time limit, logs to $OUT/run/<step>.log and cannot stop the later ones.
# $OUT ends with at most 8 files, no deeper than one folder (what the device tool brings back):
#   summary.md  env.txt  steps.tsv  gpu-results.tar.gz (everything, incl. each step's folder and log)
# Environment: MODEL (default medsr-cxr-x4, shipped; realesrgan-x4plus if its weights are cached), PYTHON.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-$ROOT/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
PY="${PYTHON:-python3}"
RUN="$OUT/run"
mkdir -p "$RUN"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MEDSR_HOME="${MEDSR_HOME:-$RUN/medsr-home}"   # caches (OpenVINO) of this run only

WHEELS="${WHEELS:-$ROOT/.whl}"
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$RUN/site" "$WHEELS"/*.whl \
        > "$RUN/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:$RUN/site"
fi

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; MODEL="${MODEL:-tiny}"; TILE=32; BATCH=2; REPEATS=1; BATCHES="1 2"; LIMIT=120; PRESET=--smoke
    PATHS="torch-fp32,torch-fp32-cl,torch-bf16-cl"; TESTS="tests/test_torch_backend.py"
    E2E="--count 3 --size 48 --tile 32 --workers 1,2"
else
    DEVICE=cuda; MODEL="${MODEL:-medsr-cxr-x4}"; TILE=256; BATCH=4; REPEATS=10; BATCHES="1 2 4 8 16"; LIMIT=240
    PRESET=--quick
    PATHS="torch-fp32,torch-fp32-cl,torch-tf32-cl,torch-bf16-cl,torch-fp16-cl,torch-compile,torch-compile-fp16,torch-cudagraph-fp16,ort-cuda,ort-cuda-fp16,trt-fp16"
    TESTS="tests"
    E2E="--count 16 --size 1024 --tile 256 --workers 1,2,4,8"
fi

printf 'step\tstatus\tseconds\n' > "$OUT/steps.tsv"
step() {  # step NAME LIMIT_S COMMAND...: run, log, record status; never stops the script
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$RUN/steps.log"
    timeout "$limit" "$@" > "$RUN/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -ne 0 ] && status="failed rc=$rc"
    [ $rc -eq 124 ] && status="timed out after ${limit}s"
    [ $rc -eq 5 ] && [[ $name == pytest* ]] && status="ok (no test selected here)"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    echo "   $status ($((SECONDS - t0)) s)" | tee -a "$RUN/steps.log"
}

# 1. environment
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  dry-run: $DRY  device: $DEVICE  model: $MODEL"
    echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
    lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-300
    command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - <<'PYEOF'
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "memory GiB", round(p.total_memory / 2**30, 1), "SMs",
          p.multi_processor_count)
for m in ("onnxruntime", "tensorrt", "openvino", "triton", "pydicom", "cv2", "imagecodecs", "pylibjpeg"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
PYEOF
} > "$OUT/env.txt" 2>&1

# GPU memory sampled through the whole run (the bench rows also carry torch's peak per path)
SMI_PID=""
if [ "$DRY" = 0 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -lms 500 > "$RUN/nvidia-smi-memory.csv" &
    SMI_PID=$!
fi

# 2. CUDA tests
step pytest-gpu "$LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rps "$TESTS"

# 3. every path on the same inputs (fp32 = TF32 off, tf32, fp16, bf16, channels_last, compile, CUDA graphs)
step bench-paths "$LIMIT" "$PY" -m medsr.cli.bench $PRESET --model "$MODEL" --device "$DEVICE" --tile "$TILE" \
    --batch "$BATCH" --repeats "$REPEATS" --paths "$PATHS" --no-scaling --out "$RUN/bench-paths"

# 4. batch sizes
for b in $BATCHES; do
    step "bench-batch$b" "$LIMIT" "$PY" -m medsr.cli.bench $PRESET --model "$MODEL" --device "$DEVICE" --tile "$TILE" \
        --batch "$b" --repeats "$REPEATS" --paths "torch-fp16-cl,torch-bf16-cl" --no-scaling \
        --out "$RUN/bench-batch$b"
done

# 5. end to end with encoders: read -> upscale -> encode overlapped, images/s vs model-only, per worker count
step pipeline "$LIMIT" "$PY" -m medsr.bench.pipeline --model "$MODEL" --device "$DEVICE" $E2E \
    --out "$RUN/pipeline.json"

[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null

# 6. one summary (markdown) from everything above
"$PY" -m medsr.bench.gpu_summary "$RUN" "$OUT/env.txt" "$OUT/steps.tsv" > "$OUT/summary.md" 2> "$RUN/summary.log" \
    || echo "summary failed: see run/summary.log" > "$OUT/summary.md"
tar -C "$OUT" -czf "$OUT/gpu-results.tar.gz" run 2>/dev/null && rm -rf "$RUN"
echo "wrote $OUT/summary.md $OUT/env.txt $OUT/steps.tsv $OUT/gpu-results.tar.gz"
