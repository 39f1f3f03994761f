#!/usr/bin/env bash
# The retina model's evaluation, run by the lead after training (issue 21). From the repository root:
#
#   benchmarks/retina/eval.sh [MODEL] [DATA] [OUT]
#
#   MODEL  registry name or weights file     (default: medsr-retina-x2; e.g. runs/retina_x2_compact/retina_x2_compact.pth)
#   DATA   the 5 evaluation photographs      (default: ../shared/data/retina; NEVER train or choose on them)
#   OUT    results folder                    (default: benchmarks/results/eval-retina-x2)
#
# 1-3. medsr-eval --protocol retina at sigma 0.5 / 1.0 / 1.5: GT = image resized to 512x512 (antialiased
#      Lanczos-3), LR = MATLAB bicubic x2 down + Gaussian blur, PSNR/SSIM on RGB, vessel PSNR; rows bicubic,
#      Lanczos, realesrgan-x4plus at x2 output ("not available" when its weights are not on the machine),
#      MODEL. Each writes results.csv, summary.md, figure.png and vessels.png (magnified vessel crops).
# 4.   CPU time (and peak memory) for one full 3410x2848 photograph through medsr-infer (-> 6820x5696).
#
# Heavy: ~1 min per sigma for the baselines + MODEL on 2 cores, plus ~1-2 min per sigma for the x4plus row
# (23 blocks at x4); step 4 is one full-size photograph. Set PY to the venv's python if needed.
set -euo pipefail
PY=${PY:-python}
MODEL=${1:-medsr-retina-x2}
DATA=${2:-../shared/data/retina}
OUT=${3:-benchmarks/results/eval-retina-x2}
mkdir -p "$OUT"

for s in 0.5 1.0 1.5; do
  echo "== sigma $s"
  "$PY" -m medsr.cli.eval "$DATA" --protocol retina --sigma "$s" --model "$MODEL" --device cpu --no-lpips -q \
    --out "$OUT/sigma$s" | tee "$OUT/sigma$s.txt"
done

echo "== CPU time per 3410x2848 photograph (IDRiD_01.jpg, x2 -> 6820x5696)"
PHOTO="$DATA/IDRiD_01.jpg"
TMP=$(mktemp -d)
if command -v /usr/bin/time >/dev/null 2>&1; then
  /usr/bin/time -v "$PY" -m medsr.cli.infer "$PHOTO" --model "$MODEL" --device cpu -o "$TMP" -q 2> "$OUT/cpu-time.txt" || true
  grep -E "medsr-infer|Elapsed|Maximum resident" "$OUT/cpu-time.txt" | tee "$OUT/cpu-time-summary.txt"
else
  { time "$PY" -m medsr.cli.infer "$PHOTO" --model "$MODEL" --device cpu -o "$TMP" -q ; } 2>&1 | tee "$OUT/cpu-time.txt"
fi
"$PY" - "$TMP/IDRiD_01.jpg" <<'PYEOF' | tee -a "$OUT/cpu-time-summary.txt"
import sys, cv2
x = cv2.imread(sys.argv[1])
print("output", None if x is None else x.shape)
PYEOF
rm -rf "$TMP"
echo "results in $OUT (copy the sigma 1.0 table and vessels.png into docs/model-card-retina-x2.md)"
