"""Three fine-tuning runs from the demo's stage-1 model, souped afterwards (the README's soup table).

Run `make demo` first (it writes workdir/demo/1_prefinetune and the mined negatives); the
environment variable DEMO_DIR names another demo workdir (`make demo WORKDIR=...`). Then:

    python -m embedder.sweep experiments/sweeps/demo_soup.py --dir workdir/sweeps/demo_soup
    python -m embedder.soup --out workdir/soups/uniform workdir/sweeps/demo_soup
    python -m embedder.soup --out workdir/soups/greedy --method greedy \
        --task data/debian/tasks/debian_retrieval --metric ndcg_at_10 --dim 64 workdir/sweeps/demo_soup
    python -m embedder.evaluate --model workdir/soups/greedy --task data/debian/tasks/debian_retrieval \
        --queries report --dims 64,16

The greedy soup sees only the selection half of debian_retrieval's queries; report the
other half (`--queries report`). The third run ignores the mined hard negatives
(`data.num_negatives=0`), a comparison with and without them.
"""
import os


def get_sweep():
    demo_dir = os.environ.get("DEMO_DIR") or "workdir/demo"
    return {
        "config": f"experiments/demo.py:finetune@{demo_dir}",
        "runs": [
            {"name": "base"},
            {"name": "lr1e-3_seed1", "optimizer.learning_rate": 1e-3, "seed": 1},
            {"name": "no_hard_negatives", "data.num_negatives": 0, "seed": 2},
        ],
    }
