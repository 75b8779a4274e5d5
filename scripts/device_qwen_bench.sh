#!/usr/bin/env bash
# Issue 12 item 6 on a lent GPU: the long-video benchmark of both shipped Qwen-VL shapes (docs/qwen.md, "Long-video
# benchmark"), bf16, 5 rounds, with the decoder's profiler tables of the Qwen2.5-VL shape packed into one archive, so
# that the call returns few files: <out>/run_<config>.{json,txt}, <out>/profile_qwen2.5-vl-7b.tar.gz, <out>/machine.txt
# (and, where flash-attn is installed, <out>/run_qwen2.5-vl-7b_fa2tower.{json,txt}: the tower on flash_attention_2).
#
#   bash scripts/device_qwen_bench.sh "$OUT"                   # on the GPU machine (see scripts/device_bundle.sh)
#   bash scripts/device_qwen_bench.sh /tmp/smoke --smoke       # the same steps at a toy shape on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: device_qwen_bench.sh OUT_DIR [--smoke]}
mkdir -p "$out"
python=${PYTHON:-python}
if [ "${2:-}" = "--smoke" ]; then
  shape=(--blocks 2 --side 8 --repeats 1 --warmup 0 --device cpu --dtype float32)
  size=(--layers 4 --width 256 --vision-depth 3 --start-layer 3)
else
  shape=(--blocks 26 --side 36 --repeats 5 --device cuda --dtype bfloat16)
  size=()
fi
{
  date -u
  uptime
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  # The tree a device call sends can be newer than the git metadata it finds there (a call ran code of a later commit
  # while HEAD there still named the first one sent), so the notes name the code by content: the sha1 of
  # `sha1sum` over every .py / .sh / .json file under analysis/, experiments/ and scripts/ in C sort order, 12 digits;
  # the same command here at a clean checkout of a commit says whether that commit is what ran.
  echo "code $(find analysis experiments scripts -type f \( -name '*.py' -o -name '*.sh' -o -name '*.json' \) \
    | LC_ALL=C sort | xargs sha1sum | sha1sum | cut -c1-12)"
} > "$out/machine.txt"
profile=$(mktemp -d)
echo "qwen2.5-vl-7b start $(date -u +%T)" >> "$out/machine.txt"   # how long each shape takes, for the next call
"$python" experiments/bench_qwen_video.py --config qwen2.5-vl-7b "${shape[@]}" "${size[@]}" \
  --out "$out/run_qwen2.5-vl-7b.json" --profile "$profile" | tee "$out/run_qwen2.5-vl-7b.txt"
tar -czf "$out/profile_qwen2.5-vl-7b.tar.gz" -C "$profile" .
rm -rf "$profile"
# The same shape with the tower on flash_attention_2 (the decoder stays sdpa), where flash-attn is installed: what the
# tower's one-call-per-window sdpa loop costs (docs/qwen.md); otherwise noted and skipped.
if "$python" -c "import flash_attn" 2>/dev/null && [ "${2:-}" != "--smoke" ]; then
  echo "qwen2.5-vl-7b tower on flash_attention_2 start $(date -u +%T)" >> "$out/machine.txt"
  "$python" experiments/bench_qwen_video.py --config qwen2.5-vl-7b "${shape[@]}" "${size[@]}" \
    --vision-attn flash_attention_2 --out "$out/run_qwen2.5-vl-7b_fa2tower.json" \
    | tee "$out/run_qwen2.5-vl-7b_fa2tower.txt"
else
  echo "tower on flash_attention_2: skipped (flash-attn not importable, or a smoke run)" >> "$out/machine.txt"
fi
echo "qwen3-vl-8b start $(date -u +%T)" >> "$out/machine.txt"
"$python" experiments/bench_qwen_video.py --config qwen3-vl-8b "${shape[@]}" "${size[@]}" \
  --out "$out/run_qwen3-vl-8b.json" | tee "$out/run_qwen3-vl-8b.txt"
echo "end $(date -u +%T)" >> "$out/machine.txt"
uptime >> "$out/machine.txt"
