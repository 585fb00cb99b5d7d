"""Gemma 3 1B-size bidirectional encoder on a TPU v5e 4x4 slice (16 chips, 4 hosts): target topology v5e:4x4.

Pre-finetuning (`:prefinetune`): 8,192 title/passage pairs per step through a 32-chunk
gradient cache, sequence length 512, in-batch negatives only, datasets mixed in each batch.
Finetuning (`:finetune`): 1,024 (query <= 128 tokens, positive, hard negative) triples per
step through a 4-chunk gradient cache, each batch from one dataset. bf16 compute, f32
parameters, full remat per block, layers scanned, FSDP over all 16 chips.
The recipe itself is `experiments/pod_recipe.py`, shared by the three pod configs.

Check it fits, here or anywhere (needs the `tpu` extra, no TPU):

    python -m embedder.train --config experiments/pod_gemma3_1b.py:prefinetune --compile_only --topology v5e:4x4

Run it (tpu_vm.sh mounts the gs:// workdir's bucket with gcsfuse at ~/gcs/BUCKET on every worker,
so training data in that bucket is read from the mount). Start from the pretrained Gemma 3:
convert it once (`python -m embedder.convert from-hf PATH/gemma-3-1b-pt gemma3_1b`, or
`from-gguf FILE.gguf gemma3_1b`), copy the export to the bucket and pass it as init_from; the
3072 -> 768 projection starts fresh from the run's seed, and an empty tokenizer.file takes the
checkpoint's own tokenizer:

    launch/tpu_vm.sh --name emb1b --zone ZONE --accelerator v5litepod-16 --workdir gs://BUCKET/emb1b \\
        -- --config experiments/pod_gemma3_1b.py:prefinetune \\
           --config.init_from=/home/USER/gcs/BUCKET/gemma3_1b --config.tokenizer.file= \\
           --config.data.datasets='[{"name": "pairs", "files": ["/home/USER/gcs/BUCKET/pairs-*.jsonl.gz"]}]'
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loaded by path (config_flags, launch/scale_table.py) from any directory
    sys.path.insert(0, str(REPO))

from experiments.pod_recipe import pod_config  # noqa: E402

TOPOLOGY = "v5e:4x4"


def get_config(arg: str = "prefinetune"):
    return pod_config(arg, source="experiments/pod_gemma3_1b.py", model="gemma3-1b", topology=TOPOLOGY,
                      mesh_shape=(1, -1, 1),
                      prefinetune_chunks=32,   # 256 rows per chunk = 16 query + 16 passage sequences per chip
                      finetune_chunks=4)      # 256 rows per chunk = 16 triples per chip
