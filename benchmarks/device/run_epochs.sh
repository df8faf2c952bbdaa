#!/usr/bin/env bash
# One prepared device run (issue 11 item 7): the three leave-one-dataset-out settings trained in parallel with the
# configs' recipe for up to 100 epochs within a wall-clock budget, each scored after 3 and 10 epochs and at the end,
# k = 2 and 4, 3 draws (draw-major, so a time-out still leaves whole draws), PatchCore on the same references.
set -u
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RESAD_CACHE=$PWD/.gpu/cache MALLOC_MMAP_THRESHOLD_=65536
T0=$(date +%s)
TOTAL=${TOTAL:-500}          # seconds for everything below, setup included
TRAIN_MIN=${TRAIN_MIN:-3.25}  # training budget per setting (minutes)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.gpu/stubs:$PWD
python3 benchmarks/device/unpack.py || exit 4
nvidia-smi -L; nproc
python3 -c "import torch, timm, lightning, anomalib, anomalib_resad; print(torch.__version__, timm.__version__, lightning.__version__, anomalib.__version__, torch.cuda.is_available())" 2>&1 | tail -1 || exit 5
echo "setup $(( $(date +%s) - T0 )) s"
LEFT=$(( TOTAL - ($(date +%s) - T0) - 25 ))
for setting in shared_pcb_crack_to_tile shared_tile_crack_to_pcb shared_pcb_tile_to_crack; do
  timeout $LEFT python3 benchmarks/ablation.py --settings $setting --output /tmp/res --epochs ${EPOCHS:-100} \
    --max_minutes $TRAIN_MIN --save_epochs 3 10 --shots 2 4 --draws 3 --no_aupro --no_source_val \
    --num_workers 4 --batch_size 32 > /tmp/log_${setting}.txt 2>&1 &
done
wait
echo "runs done $(( $(date +%s) - T0 )) s"
python3 - <<'PY'
import glob, os, pandas as pd
out = os.environ["OUT"]
for name in ("rows", "image_scores"):
    frames = [pd.read_csv(f) for f in sorted(glob.glob(f"/tmp/res/*/{name}.csv"))]
    if frames:
        pd.concat(frames).to_csv(f"{out}/{name}.csv", index=False)
        print(name, sum(len(f) for f in frames), "rows")
rows = pd.concat([pd.read_csv(f) for f in glob.glob("/tmp/res/*/rows.csv")])
t = rows[rows.role == "target"]
print(t.groupby(["setting", "variant", "k"]).image_AUROC.agg(["mean", "count"]).mul([100, 1]).round(1)
      .loc[lambda d: d.index.get_level_values(1).str.contains("PatchCore|per_class max\\+nn2 |nn2 calibrated|per_class max @")]
      .to_string())
PY
grep -h -E "epoch\(s\) completed|trained in|Traceback|Error" /tmp/log_*.txt | head -30
for f in /tmp/log_*.txt; do echo "== $f"; tail -n 3 $f; done
tar czf $OUT/logs.tgz /tmp/log_*.txt 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
