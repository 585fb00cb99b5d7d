"""The two-stage recipe (pre-finetune, then finetune) as one config for a Gemma 3 encoder on a pod.

`experiments/pod_gemma3_*.py` differ only in model size, topology, mesh and
gradient-cache chunks; everything else about method.md's recipe at pod scale
lives here, so the three stay in step.
"""

from __future__ import annotations

from embedder.train.config import ConfigDict, base_config, model_config_dict

STAGES = ("prefinetune", "finetune")
MRL_DIMS = (768, 512, 256, 128)


def pod_config(stage: str, *, source: str, model: str, topology: str, mesh_shape: tuple[int, int, int],
               prefinetune_chunks: int, finetune_chunks: int, **model_overrides) -> ConfigDict:
    """Config for `stage` of the recipe on `topology`.

    prefinetune: 8,192 title/passage pairs per step through `prefinetune_chunks`
    gradient-cache chunks, sequence length 512, in-batch negatives, datasets mixed
    in each batch. finetune: 1,024 (query <= 128 tokens, positive, hard negative)
    triples per step through `finetune_chunks` chunks, one dataset per batch.
    bf16 compute, f32 parameters and Adam state, full remat per block, layers
    scanned (compile time independent of depth). `source` names the calling file
    for error messages.
    """
    if stage not in STAGES:
        raise ValueError(f"{source}:{stage}: use :prefinetune or :finetune")
    c = base_config()
    c.topology = topology           # what `--compile_only --topology` and launch/ should use
    model_args = dict(dtype="bfloat16", param_dtype="float32", remat="full", scan_layers=True,
                      projection_dims=(3072, MRL_DIMS[0]), mrl_dims=MRL_DIMS)
    model_args.update(model_overrides)
    c.model = model_config_dict(model, **model_args)
    c.mesh.shape = tuple(mesh_shape)
    c.tokenizer.max_length = 512
    c.tokenizer.file = "tokenizer.model"   # the Gemma 3 SentencePiece model (set a real path)
    c.loss.dims = MRL_DIMS
    c.data.query_max_length = 512
    c.data.document_max_length = 512
    if stage == "prefinetune":
        c.batch_size = 8192
        c.grad_cache_chunks = prefinetune_chunks
        c.total_steps = 20_000
        c.data.mode = "mixed"
        c.data.num_negatives = 0
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 1000
    else:
        c.batch_size = 1024
        c.grad_cache_chunks = finetune_chunks
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
