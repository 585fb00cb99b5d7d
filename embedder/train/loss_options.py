"""The train step's loss functions and their options: `config.loss` is built from their keyword-only
arguments (`train.config.loss_defaults()`; an option several take, like `dims`, is shared)."""

from __future__ import annotations

import inspect

from embedder.distill.losses import embedding_distillation, score_distillation, teacher_candidate_scores
from embedder.losses import matryoshka_nce

LOSS_FUNCTIONS = (matryoshka_nce, embedding_distillation, teacher_candidate_scores, score_distillation)


def options_for(fn, options: dict) -> dict:
    """The entries of `options` that loss function `fn` takes as keyword-only arguments."""
    names = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {k: v for k, v in options.items() if k in names}
