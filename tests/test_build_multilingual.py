"""data/build_debian_multilingual.py on a tiny fixture of apt indexes written here: the join on
Description-md5, the package split read from the English files, deduplication, the tasks."""
import gzip
import hashlib
import json

import pytest

from conftest import REPO, load_script
from embedder.evaluate.tasks import load_task

bdm = load_script(REPO / "data" / "build_debian_multilingual.py")
import apt_indexes as apt  # noqa: E402  (data/, on the path once the builder is loaded)

WORDS = ("apple banana cherry delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def _long(i):
    # Distinct enough for TF-IDF: a few rare words per package.
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] + str(i) for k in range(6)) + " common words here"


# name, source, section, English synopsis, English long, German synopsis, German long
PACKAGES = [
    ("alpha", "alpha", "games", "strategy game", _long(1), "Strategiespiel", "Ein Spiel " + _long(1)),
    ("beta", "beta", "net", "network tool", _long(2), "Netzwerkwerkzeug", "Ein Werkzeug " + _long(2)),
    ("beta-dev", "beta", "libdevel", "network tool (development files)", _long(2) + " headers",
     "Netzwerkwerkzeug (Entwicklungsdateien)", "Kopfdateien " + _long(2)),
    ("beta-doc", "beta", "doc", "network tool (documentation)", _long(2) + " manual",
     "Netzwerkwerkzeug (Dokumentation)", "Handbuch " + _long(2)),
    ("gamma", "gamma", "science", "physics simulator", _long(3), "Physiksimulator", "Simulator " + _long(3)),
    ("gamma-data", "gamma-data", "science", "physics simulator (data)", _long(4), "Physiksimulator (Daten)",
     "Daten " + _long(4)),
    ("delta", "delta", "utils", "file utility", _long(5), "Dateiwerkzeug", "Werkzeug " + _long(5)),
    ("epsilon", "epsilon", "utils", "copy of delta", _long(5) + " also", "Kopie von delta", "Kopie " + _long(5)),
    ("eta", "eta", "utils", "same synopsis", _long(6), "same synopsis", ""),  # untranslated synopsis
    ("zeta", "zeta", "perl", "perl module", _long(7), "Perl-Modul", "Modul " + _long(7)),
    ("omega", "omega", "misc", "unknown pool", _long(8), "unbekannt", "Unbekannt " + _long(8)),
    ("alpha-data", "alpha", "games", "strategy game (data)", _long(9), "Strategiespiel (Daten)", "Daten " + _long(9)),
]
STALE = "gamma"  # its German text is for an older English description (another md5)


def _md5(name):
    return hashlib.md5(name.encode()).hexdigest()


def _description(synopsis, long):
    words = long.split()
    lines = [" " + " ".join(words[i:i + 5]) for i in range(0, len(words), 5)]
    return synopsis + "\n" + "\n".join(lines[:2] + [" ."] + lines[2:]) if long else synopsis


def _write_gz(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture()
def fixture(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    prefix = "deb.debian.org_debian_dists_bookworm_main_"
    packages, english, german = [], [], []
    for name, source, section, syn, long, de_syn, de_long in PACKAGES:
        src = "" if source == name else f"Source: {source} (1.0-1)\n"
        packages.append(f"Package: {name}\n{src}Version: 1.0-1\nSection: {section}\nDescription-md5: {_md5(name)}\n")
        english.append(f"Package: {name}\nDescription-md5: {_md5(name)}\nDescription-en: {_description(syn, long)}\n")
        md5 = _md5("old " + name) if name == STALE else _md5(name)
        # The translated index names a package too; the join must go by md5 only.
        german.append(f"Package: other-{name}\nDescription-md5: {md5}\nDescription-de: {_description(de_syn, de_long)}\n")
    (lists / f"{prefix}binary-amd64_Packages").write_text("\n".join(packages), encoding="utf-8")
    (lists / f"{prefix}i18n_Translation-en").write_text("\n".join(english), encoding="utf-8")
    (lists / f"{prefix}i18n_Translation-de").write_text("\n".join(german), encoding="utf-8")

    english_dir = tmp_path / "english"
    _write_gz(english_dir / "train_pairs.jsonl.gz", [{"query": "strategy game", "positive": _long(1),
                                                       "package": "alpha", "section": "games"}])
    tasks = english_dir / "tasks"
    _write_gz(tasks / "debian_retrieval" / "corpus.jsonl.gz",
              [{"_id": n, "title": "", "text": "x"} for n in ("beta-doc", "gamma", "gamma-data", "eta")])
    _write_gz(tasks / "debian_section_classification" / "test.jsonl.gz", [{"text": _long(5), "label": "utils"}])
    _write_gz(tasks / "debian_section_clustering" / "test.jsonl.gz", [{"text": _long(5) + " also", "label": "utils"}])
    _write_gz(tasks / "debian_section_classification" / "train.jsonl.gz", [{"text": _long(7), "label": "perl"}])
    return lists, english_dir


def _read(lists, kind):
    return apt.read_text(apt.index_path(lists, kind))


def test_descriptions_are_read_in_the_english_data_form():
    syn, long = apt.split_description("A  tool\n first  line\n .\n second line\n")
    assert (syn, long) == ("A tool", "first line second line")


def test_pools_from_the_shipped_english_files(fixture):
    lists, english_dir = fixture
    packages = apt.read_packages(_read(lists, "Packages"))
    assert packages["beta-doc"].source == "beta" and packages["beta"].section == "net"
    english = apt.read_translations(_read(lists, "en"), "en")
    pools = bdm.read_pools(english_dir, packages, english)
    assert pools.train == {"alpha"}
    # beta through beta-doc, gamma and gamma-data and eta through the retrieval corpus, delta and
    # epsilon through the classification test and clustering texts
    assert pools.eval == {"beta", "gamma", "gamma-data", "eta", "delta", "epsilon"}
    assert pools.ambiguous == {"zeta"}  # seen only in the classification train split


def test_join_goes_by_description_md5(fixture):
    lists, _ = fixture
    packages = apt.read_packages(_read(lists, "Packages"))
    english = apt.read_translations(_read(lists, "en"), "en")
    german = apt.read_translations(_read(lists, "de"), "de")
    rows = {r.package: r for r in bdm.join_translations(packages, english, german)}
    assert STALE not in rows  # translation of an older English text
    assert "eta" not in rows  # synopsis left in English
    assert rows["beta-dev"].synopsis == "Netzwerkwerkzeug (Entwicklungsdateien)"
    assert rows["beta-dev"].en_long == _long(2) + " headers"
    assert rows["beta"].long == "Ein Werkzeug " + _long(2)
    assert rows["beta"].source == "beta"


def test_deduplication_keeps_one_package_per_source_family_and_text():
    row = lambda name, source, long, syn=None: bdm.Row(name, source, "utils", syn or name + " synopsis", long,  # noqa: E731
                                                        (syn or name) + " übersetzt", "")
    rows = [row("foo-doc", "foo", _long(1) + " docs"), row("foo", "foo", _long(1)), row("foo-dev", "foo", _long(2)),
            row("bar-data", "bar-data", _long(3)), row("bar", "bar", _long(4)),
            row("baz", "baz", _long(5)), row("qux", "qux", _long(5) + " extra"),  # near-duplicate text
            row("quux", "quux", _long(6), syn="shared"), row("corge", "corge", _long(7), syn="shared")]
    kept = sorted(r.package for r in bdm.deduplicate(rows))
    assert kept == ["bar", "baz", "foo", "quux"]  # the shorter name of two with one synopsis
    assert bdm.family("libfoo-dev") == "libfoo" and bdm.family("foo-data-common") == "foo"
    # the package with the most translations wins a choice
    kept = {r.package for r in bdm.deduplicate(rows[:3], weight={"foo-dev": 3})}
    assert kept == {"foo-dev"}


def test_build_writes_loadable_tasks_from_the_evaluation_pool_only(fixture, tmp_path):
    lists, english_dir = fixture
    out = tmp_path / "out"
    limits = bdm.Limits(min_rows=1, min_mono_docs=1, min_per_label=1, min_labels=1, train_per_label=1)
    stats = bdm.build(lists, english_dir, out, ["de"], limits=limits, train_limit=0)
    tasks = {d.name: load_task(d) for d in sorted((out / "tasks").iterdir()) if d.is_dir()}
    assert set(tasks) == {"debian_bitext_de", "debian_xlret_de", "debian_monoret_de", "debian_section_de"}
    bitext = tasks["debian_bitext_de"]
    assert bitext.type == "bitext_mining"
    # beta (one of its source's three), delta (epsilon is its near duplicate), gamma-data (its own
    # source); gamma's translation is stale, eta's synopsis untranslated
    pairs = dict(zip(bitext.data["sentence1"], bitext.data["sentence2"]))
    assert pairs == {"Netzwerkwerkzeug": "network tool", "Dateiwerkzeug": "file utility",
                     "Physiksimulator (Daten)": "physics simulator (data)"}
    xl = tasks["debian_xlret_de"]
    assert sorted(xl.data["query_texts"]) == sorted(pairs)
    assert (out / "tasks" / "debian_xlret_de" / "corpus.jsonl.gz").is_symlink()
    training = {"alpha", "alpha-data", "zeta", "omega"}
    texts = json.dumps([t.data for t in tasks.values()])
    for name, *_, de_syn, de_long in PACKAGES:
        if name in training:
            assert de_syn not in texts and de_long not in texts, name
    assert not training & set(xl.data["corpus_ids"])
    with gzip.open(out / "train_pairs_multilingual.jsonl.gz", "rt", encoding="utf-8") as f:
        train = [json.loads(line) for line in f]
    assert {r["package"] for r in train} == {"alpha", "alpha-data"}
    assert {(r["query"], r["positive_language"]) for r in train if r["package"] == "alpha"} == {
        ("Strategiespiel", "en"), ("Strategiespiel", "de")}
    assert all(set(r) >= {"query", "positive", "package", "section", "language"} for r in train)
    assert stats["pools"]["ambiguous_sources_left_out"] == 1
