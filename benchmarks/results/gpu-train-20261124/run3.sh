#!/usr/bin/env bash
# GPU call 3 for issue 9: the compact config (narrowed classical degradation) on the full training split:
# CPU-recipe twins (4,500 it) and longer runs (8,000 it) of 4x32 and 6x48.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=/tmp/runs; mkdir -p $R $OUT
T="python3 -m medsr.cli.train --no-progress --device cuda --data .gpu/cxr-train --val .gpu/cxr-val --set data.val_split=0 --config cxr_x4_compact --from-scratch --set train.amp=off --set train.time_limit_min=7"
P=()
for s in "s4_twin 4 32 16 4500 3" "s6_twin 6 48 24 4500 3" "s4_long 4 32 16 8000 4" "s6_long 6 48 24 8000 4"; do set -- $s
  ( $T --model-override num_block=$2,num_feat=$3,num_grow_ch=$4 --max-iters $5 --set data.num_workers=$6 --out $R/$1 > $R/$1.log 2>&1 ) &
  P+=($!)
done
wait "${P[@]}"
python3 -m medsr.cli.eval .gpu/cxr --device cuda --no-lpips -q --model $R/s4_twin/cxr_x4_compact.pth --model $R/s6_twin/cxr_x4_compact.pth \
  --model $R/s4_long/cxr_x4_compact.pth --model $R/s6_long/cxr_x4_compact.pth --out $R/eval > $R/eval.log 2>&1
sha256sum $R/*/*.pth > $R/sha256.txt
mkdir -p $OUT/w
for n in s4_twin s6_twin s4_long s6_long; do cp $R/$n/cxr_x4_compact.pth $OUT/w/$n.pth 2>/dev/null; done
tar czf $OUT/logs.tgz --exclude='*.pth' --exclude='*.pt' --exclude='gt_multiscale' --exclude=tb -C /tmp runs
tail -n 2 $R/*.log; cat $R/eval/summary.md | tail -8
