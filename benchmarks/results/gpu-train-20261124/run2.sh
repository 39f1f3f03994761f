#!/usr/bin/env bash
# GPU call 2 for issue 9 (+ issue 10 evidence): size sweep with EMA warm-up, x4plus fidelity fine-tune alone, eval, GPU tests.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=/tmp/runs; mkdir -p $R $OUT
(nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > $R/gpu_usage.csv 2>&1) &
SMI=$!
T="python3 -m medsr.cli.train --no-progress --device cuda --data .gpu/cxr-train --val .gpu/cxr-val --set data.val_degradation=protocol --set data.val_split=0"
P=()
for s in "2 32 16" "4 32 16" "6 48 24" "8 64 32"; do set -- $s
  n=s${1}_${2}
  ( $T --config cxr_x4_compact --from-scratch --model-override num_block=$1,num_feat=$2,num_grow_ch=$3 \
     --set data.num_workers=2 --set train.amp=off --set train.time_limit_min=6 --out $R/$n > $R/$n.log 2>&1 ) &
  P+=($!)
done
W=.gpu/x4plus_gray_fp16.safetensors
( $T --config cxr_x4_fidelity --pretrained $W --set data.num_workers=6 --max-iters 4000 \
   --set train.time_limit_min=6 --set train.val_every=250 --set train.save_every=100000 --out $R/x4plus_fid > $R/x4plus_fid.log 2>&1 ) &
P+=($!)
wait "${P[@]}"
python3 -m medsr.cli.eval .gpu/cxr --device cuda --no-lpips -q --model $R/x4plus_fid/cxr_x4_fidelity.pth --model $R/s4_32/cxr_x4_compact.pth \
   --model $R/s6_48/cxr_x4_compact.pth --out $R/eval > $R/eval.log 2>&1
timeout 90 python3 -m pytest -q -p no:cacheprovider -m "gpu" tests/test_torch_backend.py > $R/pytest_gpu.log 2>&1
python3 - > $R/tf32.txt 2>&1 <<'PY'
import torch
print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)
from medsr.arch import RRDBNet
m = RRDBNet(3, 3, 4, 64, 2, 32).cuda().eval(); x = torch.rand(1, 3, 64, 64, device="cuda")
with torch.no_grad():
    ref = m.double()(x.double()).float(); m.float()
    for tf in (True, False):
        torch.backends.cudnn.allow_tf32 = tf
        print("cudnn tf32", tf, "mean|d| vs fp64", float((m(x) - ref).abs().mean()))
PY
kill $SMI
sha256sum $R/*/*.pth > $R/sha256.txt
mkdir -p $OUT/w
for n in s4_32 s6_48; do cp $R/$n/cxr_x4_compact.pth $OUT/w/$n.pth 2>/dev/null; done
tar czf $OUT/logs.tgz --exclude='*.pth' --exclude='*.pt' --exclude='gt_multiscale' --exclude=tb -C /tmp runs
tail -n 2 $R/*.log; cat $R/tf32.txt; cat $R/eval/summary.md | tail -12
