#!/usr/bin/env bash
# The embedded tiny checkpoints, each trained through experiments/train.py with conf/recipe/tiny.yaml from
# checkpoints/tiny-llava (300 steps x 32 twins, CPU). Re-running resumes; a finished checkpoint is skipped.
#   bash experiments/train_tiny_checkpoints.sh                 # all of them, one after the other
#   bash experiments/train_tiny_checkpoints.sh proxyv-L12 control   # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A RUNS=(
  [proxyv-L12]="variant=proxyv start_layer=12"
  [proxyv-L16]="variant=proxyv start_layer=16"
  [proxyv-L24]="variant=proxyv start_layer=24"
  [proxyv-L16-learned]="variant=proxyv start_layer=16 proxyv.init=learned"
  [proxyv-L16-learned-pdrop]="variant=proxyv start_layer=16 proxyv.init=learned reduction={method:pdrop,layers:[8,16],keep:0.7211}"
  [control]="variant=none"
  [skip_attn-L12]="variant=skip_attn start_layer=12"
  [lightmlp-L12]="variant=proxyv start_layer=12 proxyv.init=none"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(control proxyv-L12 proxyv-L16 proxyv-L24 proxyv-L16-learned proxyv-L16-learned-pdrop skip_attn-L12 lightmlp-L12)
for name in "${names[@]}"; do
  [ -n "${RUNS[$name]+x}" ] || { echo "unknown checkpoint $name (one of: ${!RUNS[*]})" >&2; exit 2; }
  out=checkpoints/tiny-llava-$name
  if [ -f "$out/training.json" ] && grep -q '"+recipe=tiny"' "$out/training.json"; then echo "$out: done"; continue; fi
  # shellcheck disable=SC2086
  .venv/bin/python experiments/train.py +recipe=tiny ${RUNS[$name]} train.output_dir=runs/train/$name
  rm -rf "$out" && cp -r runs/train/$name/model "$out"
  echo "$out: $(python3 -c "import json; print(json.load(open('$out/training.json'))['scores'])")"
done
