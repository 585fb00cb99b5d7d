"""Gemma 3 1B-size bidirectional encoder on a TPU v5e 4x4 slice (16 chips, 4 hosts): target topology v5e:4x4.

Pre-finetuning (`:prefinetune`): 8,192 title/passage pairs per step through a 16-chunk
gradient cache, sequence length 512, in-batch negatives only, datasets mixed in each batch.
Finetuning (`:finetune`): 1,024 (query <= 128 tokens, positive, hard negative) triples per
step, each batch from one dataset. bf16 compute, f32 parameters, full remat per block, FSDP over all 16 chips.

Check it fits, here or anywhere (needs the `tpu` extra, no TPU):

    python -m embedder.train --config experiments/pod_gemma3_1b.py:prefinetune --compile_only --topology v5e:4x4

Run it (the workdir on GCS; start from a converted Gemma 3 checkpoint with --config.init_from):

    launch/tpu_vm.sh --name emb1b --zone ZONE --accelerator v5litepod-16 --workdir gs://BUCKET/emb1b \\
        -- --config experiments/pod_gemma3_1b.py:prefinetune --config.tokenizer.file=/path/gemma3/tokenizer.model \\
           --config.data.datasets='[{"name": "pairs", "files": ["gs://BUCKET/pairs-*.jsonl.gz"]}]'
"""

from embedder.train.config import base_config, model_config_dict

TOPOLOGY = "v5e:4x4"


def get_config(arg: str = "prefinetune"):
    if arg not in ("prefinetune", "finetune"):
        raise ValueError(f"experiments/pod_gemma3_1b.py:{arg}: use :prefinetune or :finetune")
    c = base_config()
    c.topology = TOPOLOGY           # what `--compile_only --topology` and launch/ should use
    c.model = model_config_dict("gemma3-1b", dtype="bfloat16", param_dtype="float32", remat="full",
                                projection_dims=(3072, 768), mrl_dims=(768, 512, 256, 128))
    c.mesh.shape = (1, -1, 1)      # FSDP over every chip; the batch is split over data x fsdp
    c.tokenizer.max_length = 512
    c.tokenizer.file = "tokenizer.model"   # the Gemma 3 SentencePiece model (set a real path)
    c.loss.dims = (768, 512, 256, 128)
    c.data.query_max_length = 512
    c.data.document_max_length = 512
    if arg == "prefinetune":
        c.batch_size = 8192
        c.grad_cache_chunks = 16    # 512 rows per chunk = 32 query + 32 passage sequences per chip
        c.total_steps = 20_000
        c.data.mode = "mixed"
        c.data.num_negatives = 0
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 1000
    else:
        c.batch_size = 1024
        c.grad_cache_chunks = 4     # 256 rows per chunk = 16 triples per chip
        c.total_steps = 5000
        c.data.mode = "homogeneous"
        c.data.query_max_length = 128   # queries are short; passages and negatives keep 512
        c.data.num_negatives = 1
        c.loss.global_hard_negatives = False
        c.optimizer.learning_rate = 2e-5
        c.optimizer.warmup_steps = 200
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 1000
    return c
