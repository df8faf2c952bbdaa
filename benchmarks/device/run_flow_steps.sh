#!/usr/bin/env bash
# One prepared device run (issue 11 item 2): `flow_steps: chunk` (the reference's one flow step per 8192-position
# chunk) against today's `flow_steps: batch` at EQUAL WALL-CLOCK training time, through the product's own
# `resad evaluate` (k = 2 and 4, 3 draws, the configs' recipe otherwise), on the two texture settings where ResAD is
# closest to PatchCore (-> magnetic tile, -> CrackForest). The four trainings run side by side on one GPU, each
# stopped by Lightning's `max_time`; PatchCore on the same references rides with the `batch` runs.
#   python benchmarks/device/pack.py   # then: device run "bash benchmarks/device/run_flow_steps.sh", carry [".gpu"]
# Run it again on the same warm machine to resume the scoring (`resad evaluate` reuses finished trainings and cells);
# ad-hoc commands need its PYTHONPATH (kornia_rs stubs) and RESAD_CACHE (the offline weights) too.
set -u
export OMP_NUM_THREADS=3 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RESAD_CACHE=$PWD/.gpu/cache MALLOC_MMAP_THRESHOLD_=65536
T0=$(date +%s)
TOTAL=${TOTAL:-530}             # seconds for everything below, setup included
TRAIN=${TRAIN:-00:00:04:00}     # training wall-clock per run (Lightning max_time, DD:HH:MM:SS)
SETTINGS=${SETTINGS:-"shared_pcb_crack_to_tile shared_pcb_tile_to_crack"}
EXTRA=${EXTRA:-}                # more `resad evaluate` arguments (a local dry run: --shots [2] --draws 1)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.gpu/stubs:$PWD
[ -n "${SKIP_UNPACK:-}" ] || python3 benchmarks/device/unpack.py || exit 4  # never locally: it writes ../shared/data
nvidia-smi -L; nproc --all
python3 -c "import torch, timm, lightning, anomalib, anomalib_resad; print(torch.__version__, timm.__version__, lightning.__version__, anomalib.__version__, torch.cuda.is_available())" || exit 5
echo "setup $(( $(date +%s) - T0 )) s"
LEFT=$(( TOTAL - ($(date +%s) - T0) - 20 ))
[ "$LEFT" -gt 60 ] || { echo "setup left only $LEFT s"; exit 6; }
for setting in $SETTINGS; do
  for steps in batch chunk; do
    if [ $steps = batch ]; then extra=(--baselines '[patchcore]'); else extra=(--baselines '[]' --model.flow_positions 8192); fi
    timeout -k 15 $LEFT python3 -m anomalib_resad.cli evaluate --config configs/settings/$setting.yaml \
      --output_dir /tmp/res/${setting}_$steps --trainer.max_epochs 100 --trainer.max_time $TRAIN \
      --trainer.enable_progress_bar false --model.flow_steps $steps "${extra[@]}" --cost false \
      --maps_per_category 0 --num_workers 3 $EXTRA > /tmp/res_log_${setting}_$steps.txt 2>&1 &
  done
done
wait
echo "runs done $(( $(date +%s) - T0 )) s"
python3 - <<'PY'
import glob, os, torch
for path in sorted(set(glob.glob("/tmp/res/*/train/**/*.ckpt", recursive=True))):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    print(path, "epoch", checkpoint["epoch"], "global_step", checkpoint["global_step"])
PY
grep -h -E "Trained in|Time limit|Traceback|Error" /tmp/res_log_*.txt | head -20
for f in /tmp/res/*/summary.md; do echo "== $f"; cat $f; done
for f in /tmp/res_log_*.txt; do echo "== $f"; tail -n 4 $f; done
tar czf $OUT/flow_steps.tgz --exclude='*.ckpt' --exclude='references' /tmp/res /tmp/res_log_*.txt 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
