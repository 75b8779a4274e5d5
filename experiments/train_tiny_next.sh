#!/usr/bin/env bash
# tiny-llava-next end to end on one GPU (docs/tiny_next.md): build the LLaVA-NeXT model from checkpoints/tiny-llava
# (analysis/tiny_next.py), fine-tune it with conf/recipe/tiny_next.yaml on the 128 px twins (bf16, 600 steps x 32),
# score it on 200 eval samples per synth_*_hr twin and blind, save it in float16 with its training.json, then score it
# with the base crop only and with blank crops ($OUT/model/crop_eval.json).
# Offline: needs only torch, transformers and the repo's pure-Python deps (the twins are drawn here, not downloaded).
#   bash experiments/train_tiny_next.sh                                 # -> runs/train/next/model
#   OUT=/tmp/next SHIP=1 bash experiments/train_tiny_next.sh            # and copy it to checkpoints/tiny-llava-next
#   bash experiments/train_tiny_next.sh train.max_steps=800 data.twins_per_task=6400   # more steps (4 x 6400 = 800 x 32)
# Budget on one H200 (estimated, not yet run there): data ~30 s (19,200 records drawn by 8 processes, tokenised by up
# to 12), 600 steps at ~0.2 s, eval ~20 s: ~3-4 min. Re-running resumes from the last checkpoint in $OUT/checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/train/next}
CPUS=$(nproc)
WORKERS=$(( CPUS > 12 ? 12 : CPUS ))
LOADERS=$(( CPUS / 4 > 0 ? CPUS / 4 : 1 ))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$(date +%s)
[ -f "$OUT/init/config.json" ] || $PY -m analysis.tiny_next --out "$OUT/init"
$PY experiments/train.py +recipe=tiny_next model=tiny-next model.pretrained="$OUT/init" train.output_dir="$OUT" \
  data.workers="$WORKERS" train.attn_implementation=sdpa train.threads=4 \
  +train.args.dataloader_num_workers="$LOADERS" +train.args.dataloader_persistent_workers=true "$@"
echo "build + train + eval: $(( $(date +%s) - start )) s; $(du -h "$OUT/model/model.safetensors" | cut -f1) model.safetensors"
$PY -c "import json, sys; r = json.load(open(sys.argv[1])); print('scores', r.get('scores')); print('blind', r.get('blind'))" \
  "$OUT/model/training.json"
# The crops' share of the score: the trained model with the base crop only and with blank crops (docs/tiny_next.md).
$PY -m analysis.tiny_next --checkpoint "$OUT/model" --eval "${CROP_EVAL_N:-200}" --modes base_only blank_crops \
  --batch-size 32 --json "$OUT/model/crop_eval.json" > "$OUT/crop_eval.log" 2>&1 && \
  $PY -c "import json, sys; print('crops', json.load(open(sys.argv[1]))['scores'])" "$OUT/model/crop_eval.json"
echo "total wall $(( $(date +%s) - start )) s"
if [ "${SHIP:-0}" = 1 ]; then
  rm -rf checkpoints/tiny-llava-next && cp -r "$OUT/model" checkpoints/tiny-llava-next
  echo "copied to checkpoints/tiny-llava-next"
fi
