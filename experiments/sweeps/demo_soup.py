"""Three fine-tuning runs from the demo's stage-1 model, souped afterwards (the README's soup table).

Run `make demo` first (it writes workdir/demo/1_prefinetune and the mined negatives). Then:

    python -m embedder.sweep experiments/sweeps/demo_soup.py --dir workdir/sweeps/demo_soup
    python -m embedder.soup --out workdir/soups/uniform workdir/sweeps/demo_soup
    python -m embedder.soup --out workdir/soups/greedy --method greedy \
        --task data/debian/tasks/debian_retrieval workdir/sweeps/demo_soup

The third run ignores the mined hard negatives (`data.num_negatives=0`), which
also measures what the hard negatives add.
"""


def get_sweep():
    return {
        "config": "experiments/demo.py:finetune@workdir/demo",
        "runs": [
            {"name": "base"},
            {"name": "lr1e-3_seed1", "optimizer.learning_rate": 1e-3, "seed": 1},
            {"name": "no_hard_negatives", "data.num_negatives": 0, "seed": 2},
        ],
    }
