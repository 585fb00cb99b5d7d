"""Builds multilingual Debian tasks and training pairs from Debian's human translations of
package descriptions (the Debian Description Translation Project), with the package split of
the English Debian data in data/debian.

Inputs are apt's indexes for Debian 12 (bookworm) `main`:

    apt-get update -o Acquire::Languages="en,da,it,fr,de,sk,pt_BR,ja,ko,uk,pl,ru,cs,es,zh_CN"
    nice -n 10 .venv/bin/python data/build_debian_multilingual.py   # --help for the options

A translated index (`*_main_i18n_Translation-XX.lz4`) holds `Package`, `Description-md5` and
`Description-XX` (synopsis line, then the long description indented); it joins to the English
index and to `Packages` on `Description-md5`, so only translations of the current English text
are used.

Pools: the English data's seeded split function is not in this repository and could not be
reconstructed, so pool membership is read from the shipped English files (see `read_pools`).
Evaluation tasks use evaluation-pool packages only; training pairs use training-pool packages
only; packages of any other source are left out.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import json
import pathlib
import sys
from typing import Iterable

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # its sibling module, when loaded from elsewhere
    sys.path.insert(0, str(HERE))

from apt_indexes import Package, index_path, read_packages, read_text, read_translations  # noqa: E402

LANGUAGES = ("da", "it", "fr", "de", "sk", "pt_BR", "ja", "ko", "uk", "pl", "ru", "cs", "es", "zh_CN")
# Suffixes of a package's variants: `foo-dev`, `foo-doc`, `foo-data` ... belong to family `foo`.
VARIANT_SUFFIXES = ("-dev", "-doc", "-docs", "-data", "-common", "-dbg", "-examples", "-bin", "-utils", "-tools")


# ---------------------------------------------------------------- pools and joins

@dataclasses.dataclass
class Pools:
    train: set[str]      # source packages of the training pool
    eval: set[str]       # source packages of the evaluation pool
    ambiguous: set[str]  # sources seen only where the pool cannot be told (left out)


def read_pools(english_dir: pathlib.Path, packages: dict[str, Package],
               english: dict[str, tuple[str, str]]) -> Pools:
    """Pool membership of source packages, from the shipped English files.

    A source with a package in `train_pairs` is training pool; one with a document of
    `debian_retrieval`, or a text of the classification test split or of the clustering
    task, is evaluation pool. The English classification *train* split was drawn from the
    training pool, so a source seen only there is ambiguous. Every other source is left out.
    """
    english_dir = pathlib.Path(english_dir)
    source_of = {name: p.source for name, p in packages.items()}
    by_text = collections.defaultdict(set)
    for p in packages.values():
        if p.md5 in english:
            by_text[english[p.md5][1]].add(p.source)

    def jsonl(path):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    train = {source_of[r["package"]] for r in jsonl(english_dir / "train_pairs.jsonl.gz") if r["package"] in source_of}
    tasks = english_dir / "tasks"
    evaluation = {source_of[r["_id"]] for r in jsonl(tasks / "debian_retrieval" / "corpus.jsonl.gz")
                  if r["_id"] in source_of}
    for rel in ("debian_section_classification/test.jsonl.gz", "debian_section_clustering/test.jsonl.gz"):
        for r in jsonl(tasks / rel):
            evaluation |= by_text.get(r["text"], set())
    ambiguous = set()
    for r in jsonl(tasks / "debian_section_classification" / "train.jsonl.gz"):
        ambiguous |= by_text.get(r["text"], set())
    evaluation -= train | ambiguous
    return Pools(train=train, eval=evaluation, ambiguous=ambiguous - train)


@dataclasses.dataclass
class Row:
    """One package whose current English description has a translation."""
    package: str
    source: str
    section: str
    en_synopsis: str
    en_long: str
    synopsis: str      # translated
    long: str          # translated ('' when the translation has none)


def join_translations(packages: dict[str, Package], english: dict[str, tuple[str, str]],
                      translated: dict[str, tuple[str, str]]) -> list[Row]:
    """Packages whose Description-md5 is in both the English and the translated index, by name.
    A translated synopsis equal to the English one (names, untranslated) is dropped; a translated
    long description equal to the English one counts as absent."""
    rows = []
    for name in sorted(packages):
        p = packages[name]
        if p.md5 not in english or p.md5 not in translated:
            continue
        en_syn, en_long = english[p.md5]
        syn, long = translated[p.md5]
        if not syn or not en_syn or not en_long or syn.casefold() == en_syn.casefold():
            continue
        rows.append(Row(name, p.source, p.section, en_syn, en_long, syn, "" if long == en_long else long))
    return rows


def family(name: str) -> str:
    """`libfoo-dev`, `foo-doc`, `foo-data` -> `libfoo`, `foo`, `foo`: the package's variant family."""
    changed = True
    while changed:
        changed = False
        for suffix in VARIANT_SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name, changed = name[: -len(suffix)], True
    return name


def _preference(row: Row, weight: dict[str, int]) -> tuple:
    # The most translated package first (`weight`), then the one named after its source, then one
    # that is not a variant, then the shortest name.
    return (-weight.get(row.package, 0), row.package != row.source, family(row.package) != row.package,
            len(row.package), row.package)


def near_duplicates(texts: list[str], threshold: float = 0.9) -> set[int]:
    """Indices to drop so that no two kept texts have TF-IDF cosine >= threshold (earlier kept)."""
    if len(texts) < 2:
        return set()
    from sklearn.feature_extraction.text import TfidfVectorizer
    matrix = TfidfVectorizer(sublinear_tf=True).fit_transform(texts)
    sims = (matrix @ matrix.T).tocsr()
    dropped: set[int] = set()
    for i in range(len(texts)):
        if i in dropped:
            continue
        row = sims.getrow(i)
        for j, s in zip(row.indices, row.data):
            if j > i and s >= threshold:
                dropped.add(int(j))
    return dropped


def deduplicate(rows: list[Row], threshold: float = 0.9, weight: dict[str, int] | None = None) -> list[Row]:
    """One package per source and per variant family (`-dev`, `-doc`, `-data` ... go), then no
    repeated synopsis (English or translated) or English description, then no English
    descriptions closer than `threshold` in TF-IDF cosine. Where a choice is made, the package
    with the largest `weight` (number of translations) stays."""
    weight = weight or {}

    def preference(row):
        return _preference(row, weight)

    best: dict[str, Row] = {}
    for row in sorted(rows, key=preference):
        best.setdefault(row.source, row)
    kept, seen = [], set()
    for row in sorted(best.values(), key=preference):
        keys = {("family", family(row.package)), ("en_syn", row.en_synopsis.casefold()),
                ("syn", row.synopsis.casefold()), ("en_long", row.en_long.casefold())}
        if keys & seen:
            continue
        seen |= keys
        kept.append(row)
    drop = near_duplicates([r.en_long for r in kept], threshold)
    return [r for i, r in enumerate(kept) if i not in drop]


# ---------------------------------------------------------------- tasks

def seeded_order(items: Iterable, seed: int, key=lambda x: x) -> list:
    """Items sorted by a seeded SHA-256 of their key: stable whatever the input order."""
    return sorted(items, key=lambda x: hashlib.sha256(f"{seed}:{key(x)}".encode()).hexdigest())


def write_jsonl_gz(path: pathlib.Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    # mtime=0: the same records give the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    return n


def write_task_json(directory: pathlib.Path, task_type: str, name: str, prompt: str, language: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"type": task_type, "name": name, "prompt": prompt, "language": language}
    (directory / "task.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def write_retrieval(directory: pathlib.Path, queries: list[tuple[str, str]], corpus: list[tuple[str, str]] | None,
                    qrels: list[tuple[str, str]]) -> None:
    if corpus is not None:
        write_jsonl_gz(directory / "corpus.jsonl.gz", ({"_id": i, "title": "", "text": t} for i, t in corpus))
    write_jsonl_gz(directory / "queries.jsonl.gz", ({"_id": i, "text": t} for i, t in queries))
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    with open(directory / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d in qrels:
            f.write(f"{q}\t{d}\t1\n")


@dataclasses.dataclass
class Limits:
    bitext_pairs: int = 500         # bitext mining: sentence pairs
    queries: int = 300              # retrieval queries per task
    english_corpus: int = 2000      # the English corpus that every cross-lingual task shares
    mono_corpus: int = 1000         # monolingual retrieval documents per task
    min_rows: int = 100             # fewer deduplicated rows: no task for the language
    min_mono_docs: int = 250        # fewer translated descriptions: no monolingual retrieval
    min_per_label: int = 40         # a section enters classification with this many rows
    min_labels: int = 4             # fewer sections kept: no classification for the language
    max_labels: int = 10            # the largest sections only
    train_per_label: int = 16       # classification train rows per section (MTEB's 16-shot set)
    test_per_label: int = 32        # classification test rows per section at most


ENGLISH_CORPUS = "debian_english_corpus.jsonl.gz"


def build_language_tasks(language: str, rows: list[Row], english_corpus: set[str], out: pathlib.Path,
                         limits: Limits, seed: int = 0) -> dict[str, dict]:
    """Writes the tasks of one language under `out`; returns {task folder: counts}.

    `english_corpus` names the packages of the shared English corpus (`out/ENGLISH_CORPUS`,
    written by `write_english_corpus`), which each cross-lingual task links to."""
    counts: dict[str, dict] = {}
    if len(rows) < limits.min_rows:
        return counts
    tag = language.lower().replace("_", "-")
    ordered = seeded_order(rows, seed, key=lambda r: r.package)

    # Bitext mining: translated synopsis -> its English synopsis among all of them.
    pairs = ordered[: limits.bitext_pairs]
    folder = out / f"debian_bitext_{tag}"
    write_task_json(folder, "bitext_mining", f"DebianBitextMining.{language}", "sentence similarity",
                    language)
    write_jsonl_gz(folder / "test.jsonl.gz", ({"sentence1": r.synopsis, "sentence2": r.en_synopsis,
                                               "package": r.package} for r in pairs))
    counts[folder.name] = {"pairs": len(pairs)}

    # Cross-lingual retrieval: translated synopsis -> English description, in the shared corpus.
    queries = [r for r in ordered if r.package in english_corpus][: limits.queries]
    folder = out / f"debian_xlret_{tag}"
    write_task_json(folder, "retrieval", f"DebianCrossLingualRetrieval.{language}", "search result", language)
    write_retrieval(folder, [(f"q:{r.package}", r.synopsis) for r in queries], None,
                    [(f"q:{r.package}", r.package) for r in queries])
    link = folder / "corpus.jsonl.gz"
    link.unlink(missing_ok=True)
    link.symlink_to(pathlib.Path("..") / ENGLISH_CORPUS)
    counts[folder.name] = {"queries": len(queries), "corpus": len(english_corpus)}

    # Monolingual retrieval: translated synopsis -> translated description.
    described, seen = [], set()
    for r in ordered:
        if r.long and r.long.casefold() not in seen:
            seen.add(r.long.casefold())
            described.append(r)
    if len(described) >= limits.min_mono_docs:
        docs = described[: limits.mono_corpus]
        queries = docs[: limits.queries]
        folder = out / f"debian_monoret_{tag}"
        write_task_json(folder, "retrieval", f"DebianRetrieval.{language}", "search result", language)
        write_retrieval(folder, [(f"q:{r.package}", r.synopsis) for r in queries],
                        sorted((r.package, r.long) for r in docs), [(f"q:{r.package}", r.package) for r in queries])
        counts[folder.name] = {"queries": len(queries), "corpus": len(docs)}

    # Section classification on translated descriptions, the largest sections with enough rows.
    by_label = collections.defaultdict(list)
    for r in described:
        by_label[r.section].append(r)
    labels = sorted((s for s, rs in by_label.items() if s and len(rs) >= limits.min_per_label),
                    key=lambda s: (-len(by_label[s]), s))[: limits.max_labels]
    if len(labels) >= limits.min_labels:
        train, test = [], []
        for s in sorted(labels):
            rs = by_label[s]
            train += rs[: limits.train_per_label]
            test += rs[limits.train_per_label: limits.train_per_label + limits.test_per_label]
        folder = out / f"debian_section_{tag}"
        write_task_json(folder, "classification", f"DebianSectionClassification.{language}", "classification",
                        language)
        write_jsonl_gz(folder / "train.jsonl.gz", ({"text": r.long, "label": r.section} for r in train))
        write_jsonl_gz(folder / "test.jsonl.gz", ({"text": r.long, "label": r.section} for r in test))
        counts[folder.name] = {"train": len(train), "test": len(test), "labels": len(labels)}
    return counts


def write_english_corpus(out: pathlib.Path, rows: list[Row], weight: dict[str, int], size: int,
                         seed: int = 0) -> set[str]:
    """The English descriptions every cross-lingual task searches: the `size` most translated
    evaluation packages (ties in seeded order); returns their names."""
    ordered = seeded_order(rows, seed, key=lambda r: r.package)
    ordered.sort(key=lambda r: -weight.get(r.package, 0))
    chosen = sorted(ordered[:size], key=lambda r: r.package)
    write_jsonl_gz(out / ENGLISH_CORPUS, ({"_id": r.package, "title": "", "text": r.en_long} for r in chosen))
    return {r.package for r in chosen}


def training_pairs(language: str, rows: list[Row], limit: int, seed: int = 0) -> list[dict]:
    """Training-pool pairs of one language: translated synopsis -> English description and
    translated synopsis -> translated description, at most `limit` packages (0: all)."""
    ordered = seeded_order(rows, seed, key=lambda r: r.package)
    if limit:
        ordered = ordered[:limit]
    out, seen = [], set()
    for r in ordered:
        for positive, positive_language in ((r.en_long, "en"), (r.long, language)):
            if not positive or (r.synopsis, positive) in seen:
                continue
            seen.add((r.synopsis, positive))
            out.append({"query": r.synopsis, "positive": positive, "package": r.package, "section": r.section,
                        "language": language, "positive_language": positive_language})
    return out


# ---------------------------------------------------------------- the build

def build(lists: pathlib.Path, english_dir: pathlib.Path, out: pathlib.Path, languages: Iterable[str],
          limits: Limits = Limits(), train_limit: int = 1000, seed: int = 0, threshold: float = 0.9) -> dict:
    """Reads the indexes, writes every task and the training pairs; returns the counts."""
    languages = list(languages)
    packages = read_packages(read_text(index_path(lists, "Packages")))
    english = read_translations(read_text(index_path(lists, "en")), "en")
    pools = read_pools(english_dir, packages, english)
    eval_packages = {n: p for n, p in packages.items() if p.source in pools.eval}
    train_packages = {n: p for n, p in packages.items() if p.source in pools.train}
    translations = {lang: read_translations(read_text(index_path(lists, lang)), lang) for lang in languages}

    # One deduplicated set of evaluation packages for every language, keeping the most translated.
    weight = {n: sum(p.md5 in t for t in translations.values()) for n, p in eval_packages.items()}
    en_rows = [Row(n, p.source, p.section, *english[p.md5], *english[p.md5])
               for n, p in sorted(eval_packages.items()) if p.md5 in english and all(english[p.md5])]
    kept = deduplicate(en_rows, threshold, weight)
    kept_names = {r.package for r in kept}
    tasks_dir = out / "tasks"
    english_corpus = write_english_corpus(tasks_dir, kept, weight, limits.english_corpus, seed)

    stats = {"pools": {"train_sources": len(pools.train), "eval_sources": len(pools.eval),
                       "ambiguous_sources_left_out": len(pools.ambiguous),
                       "other_sources_left_out": len({p.source for p in packages.values()}
                                                     - pools.train - pools.eval - pools.ambiguous),
                       "eval_packages_after_dedup": len(kept), "english_corpus": len(english_corpus)},
             "languages": {}, "tasks": {}}
    pairs = []
    for language in languages:
        translated = translations[language]
        joined = join_translations({n: eval_packages[n] for n in kept_names}, english, translated)
        eval_rows = deduplicate(joined, threshold, weight)
        train_rows = join_translations(train_packages, english, translated)
        stats["languages"][language] = {"translations": len(translated),
                                        "current": sum(1 for m in translated if m in english),
                                        "eval_rows": len(eval_rows), "train_rows": len(train_rows)}
        stats["tasks"].update(build_language_tasks(language, eval_rows, english_corpus, tasks_dir, limits, seed))
        lang_pairs = training_pairs(language, train_rows, train_limit, seed)
        stats["languages"][language]["train_pairs"] = len(lang_pairs)
        pairs += lang_pairs
        print(language, stats["languages"][language], flush=True)
    stats["train_pairs"] = write_jsonl_gz(out / "train_pairs_multilingual.jsonl.gz", pairs)
    (out / "counts.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return stats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lists", default="/var/lib/apt/lists", help="apt's index folder")
    p.add_argument("--english", default=str(HERE / "debian"), help="the English Debian data (pool membership)")
    p.add_argument("--out", default=str(HERE / "multilingual"))
    p.add_argument("--languages", default=",".join(LANGUAGES))
    p.add_argument("--train_per_language", type=int, default=1000,
                   help="training-pool packages per language in the pairs (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stats = build(pathlib.Path(args.lists), pathlib.Path(args.english), pathlib.Path(args.out),
                  [x for x in args.languages.split(",") if x], train_limit=args.train_per_language, seed=args.seed)
    print(json.dumps(stats["pools"]), stats["train_pairs"], "training pairs")


if __name__ == "__main__":
    main()
