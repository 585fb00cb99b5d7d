"""Gemma 3 4B-size bidirectional encoder on a TPU v6e 4x8 slice (32 chips, 8 hosts): target topology v6e:4x8.

Pre-finetuning (`:prefinetune`): 8,192 title/passage pairs per step through a 32-chunk
gradient cache, sequence length 512, in-batch negatives only, datasets mixed in each batch.
Finetuning (`:finetune`): 1,024 (query <= 128 tokens, positive, hard negative) triples per
step through a 8-chunk gradient cache, each batch from one dataset. bf16 compute, f32
parameters, full remat per block, layers scanned, FSDP over all 32 chips.
The recipe itself is `experiments/pod_recipe.py`, shared by the three pod configs.

Check it fits, here or anywhere (needs the `tpu` extra, no TPU):

    python -m embedder.train --config experiments/pod_gemma3_4b.py:prefinetune --compile_only --topology v6e:4x8

Run it (tpu_vm.sh mounts the gs:// workdir's bucket with gcsfuse at ~/gcs/BUCKET on every worker,
so training data in that bucket is read from the mount). Start from the pretrained Gemma 3:
convert it once (`python -m embedder.convert from-hf PATH/gemma-3-4b-pt gemma3_4b`, or
`from-gguf FILE.gguf gemma3_4b`), copy the export to the bucket and pass it as init_from; the
3072 -> 768 projection starts fresh from the run's seed, and an empty tokenizer.file takes the
checkpoint's own tokenizer:

    launch/tpu_vm.sh --name emb4b --zone ZONE --accelerator v6e-32 --workdir gs://BUCKET/emb4b \\
        -- --config experiments/pod_gemma3_4b.py:prefinetune \\
           --config.init_from=/home/USER/gcs/BUCKET/gemma3_4b --config.tokenizer.file= \\
           --config.data.datasets='[{"name": "pairs", "files": ["/home/USER/gcs/BUCKET/pairs-*.jsonl.gz"]}]'
"""

import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # loaded by path (config_flags, launch/scale_table.py) from any directory
    sys.path.insert(0, str(REPO))

from experiments.pod_recipe import pod_config  # noqa: E402

TOPOLOGY = "v6e:4x8"


def get_config(arg: str = "prefinetune"):
    return pod_config(arg, source="experiments/pod_gemma3_4b.py", model="gemma3-4b", topology=TOPOLOGY,
                      mesh_shape=(1, -1, 1),
                      prefinetune_chunks=32,   # 256 rows per chunk = 8 query + 8 passage sequences per chip
                      finetune_chunks=8)      # 128 rows per chunk = 4 triples per chip
