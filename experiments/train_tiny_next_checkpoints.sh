#!/usr/bin/env bash
# ProxyV on the tiny LLaVA-NeXT and its control (issue 13): each fine-tuned through experiments/train.py with
# conf/recipe/tiny_next_ft.yaml from $BASE (default checkpoints/tiny-llava-next), 300 steps x 32 of the 128 px
# twins, then copied to checkpoints/tiny-llava-next-<name>. Re-running resumes; a finished checkpoint is skipped.
#   bash experiments/train_tiny_next_checkpoints.sh                    # all, one after the other (CPU: hours)
#   PARALLEL=1 bash experiments/train_tiny_next_checkpoints.sh         # all at once (one GPU: they are launch-bound)
#   bash experiments/train_tiny_next_checkpoints.sh proxyv-L12 control # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BASE=${BASE:-checkpoints/tiny-llava-next}
OUT=${OUT:-runs/train}
DEST=${DEST:-checkpoints}   # where the finished models are copied
# EXTRA: more overrides for every run, e.g. EXTRA="train.max_steps=1" for a smoke test
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
declare -A RUNS=(
  [control]="variant=none"
  [proxyv-L12]="variant=proxyv start_layer=12"
  [proxyv-L16]="variant=proxyv start_layer=16"
  [proxyv-L16-learned]="variant=proxyv start_layer=16 proxyv.init=learned"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(control proxyv-L12 proxyv-L16 proxyv-L16-learned)
CPUS=$(nproc)
JOBS=1; [ "${PARALLEL:-0}" = 1 ] && JOBS=${#names[@]}
SHARE=$(( CPUS / JOBS ))
WORKERS=$(( SHARE > 12 ? 12 : (SHARE > 0 ? SHARE : 1) ))
one() {
  local name=$1 out=$DEST/tiny-llava-next-$1
  if [ -f "$out/training.json" ] && grep -q '"+recipe=tiny_next_ft"' "$out/training.json"; then echo "$out: done"; return; fi
  # shellcheck disable=SC2086
  $PY experiments/train.py +recipe=tiny_next_ft model=tiny-next model.pretrained="$BASE" ${RUNS[$name]} \
    train.output_dir="$OUT/next-$name" data.workers="$WORKERS" ${EXTRA:-} > "$OUT/next-$name.log" 2>&1 \
    || { echo "$name failed: $OUT/next-$name.log" >&2; tail -5 "$OUT/next-$name.log" >&2; return 1; }
  rm -rf "$out" && cp -r "$OUT/next-$name/model" "$out"
  echo "$out: $($PY -c "import json; print(json.load(open('$out/training.json'))['scores'])")"
}
mkdir -p "$OUT"
for name in "${names[@]}"; do
  [ -n "${RUNS[$name]+x}" ] || { echo "unknown checkpoint $name (one of: ${!RUNS[*]})" >&2; exit 2; }
done
if [ "${PARALLEL:-0}" = 1 ]; then
  pids=(); for name in "${names[@]}"; do one "$name" & pids+=($!); done
  status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done; exit $status
fi
for name in "${names[@]}"; do one "$name"; done
