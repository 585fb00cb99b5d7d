"""Fine-tuning sweep over learning rate, seed and temperature; its runs are soup ingredients.

Every run starts from the demo's stage-1 model (run `make demo` first), so the runs share an
initialisation and can be averaged.

    python -m embedder.sweep experiments/sweeps/finetune_lr_seed.py --dir workdir/sweeps/lr_seed
    python -m embedder.sweep experiments/sweeps/finetune_lr_seed.py --dir DIR --print   # for a cluster
    python -m embedder.soup --out workdir/soups/lr_seed --method greedy \
        --task data/debian/tasks/debian_retrieval workdir/sweeps/lr_seed
"""


def get_sweep():
    return {
        "config": "experiments/demo.py:finetune@workdir/demo",  # after `make demo`
        # Soups need runs that share an initialisation: vary only what fine-tuning varies.
        "grid": {
            "optimizer.learning_rate": [3e-4, 1e-3],
            "seed": [0, 1],
        },
        "runs": [
            {"name": "temp05", "loss.temperature": 0.05},
            {"name": "temp02", "loss.temperature": 0.02},
        ],
    }
