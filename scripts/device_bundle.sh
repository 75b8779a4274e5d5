#!/usr/bin/env bash
# What a lent GPU machine lacks for this repo's GPU scripts (it has torch and an older transformers, and no network):
# the pinned pure-Python dependencies as wheels in .whl/, and a minimal `lmms_eval` in .devsite/ -- the metric code the
# twins score with (anls, the ChartQA / OCRBench / TextVQA result processors, the VQA answer normaliser), copied from
# the installed lmms-eval. Both folders are git-ignored (added to .git/info/exclude); name them in the device call's
# `carry` and begin its command with:
#   python -m pip install -q --no-deps --no-index .whl/*.whl; export PYTHONPATH=$PWD:$PWD/.devsite
# (checkpoints/ is over the transfer limit: hide it from git for the call and carry only the ones needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "error: no .venv; run bash scripts/setup.sh first" >&2; exit 1; }
pins=()
for p in transformers tokenizers safetensors hydra-core omegaconf antlr4-python3-runtime loguru; do
  pin=$(grep -i "^$p==" constraints.txt) || { echo "error: $p is not pinned in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
mkdir -p .whl
.venv/bin/pip wheel -q --no-deps -w .whl "${pins[@]}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python - <<'PY'
import inspect
import shutil
from pathlib import Path

import lmms_eval
import lmms_eval.api.metrics as metrics

src, out = Path(lmms_eval.__file__).parent, Path(".devsite/lmms_eval")
shutil.rmtree(out, ignore_errors=True)
for module in ("tasks/_task_utils/vqa_eval_metric.py", "tasks/_task_utils/file_utils.py", "tasks/chartqa/utils.py",
               "tasks/ocrbench/utils.py", "tasks/textvqa/utils.py"):
    (out / module).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / module, out / module)
(out / "api").mkdir(parents=True, exist_ok=True)
anls = inspect.getsource(metrics.anls)
(out / "api" / "metrics.py").write_text(  # anls alone: the real module pulls in lmms-eval's registry and sacrebleu
    "import numpy as np\n\n\n" + inspect.getsource(metrics.levenshtein_distance) + "\n\n" + anls[anls.index("def anls("):])
for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
    (folder / "__init__.py").touch()
PY
for d in /.whl/ /.devsite/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
echo "device bundle: $(ls .whl | wc -l) wheels in .whl/ ($(du -sh .whl | cut -f1)), lmms_eval stub in .devsite/"
