"""Reading apt's indexes (Debian 12 `main`): plain or lz4 files, RFC 822 stanzas, the `Packages`
index and the `Translation-XX` indexes of package descriptions, in data/debian's text form."""
from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
from typing import Iterator


def read_text(path: pathlib.Path) -> str:
    """A plain or lz4-compressed index as text."""
    path = pathlib.Path(path)
    if path.suffix != ".lz4":
        return path.read_text(encoding="utf-8", errors="replace")
    try:
        import lz4.frame
        raw = lz4.frame.decompress(path.read_bytes())
    except ImportError:
        raw = subprocess.run(["lz4cat", str(path)], capture_output=True, check=True).stdout
    return raw.decode("utf-8", errors="replace")


def parse_index(text: str) -> Iterator[dict[str, str]]:
    """RFC 822 stanzas of an apt index; continuation lines stay in their field, joined by '\\n'."""
    for stanza in re.split(r"\n\s*\n", text):
        record: dict[str, str] = {}
        key = None
        for line in stanza.split("\n"):
            if line[:1] in (" ", "\t") and key:
                record[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                record[key] = value.strip()
        if record:
            yield record


def split_description(description: str) -> tuple[str, str]:
    """(synopsis, long description) with whitespace collapsed and ' .' paragraph lines dropped:
    the text form of data/debian (checked on all 24,068 shipped training pairs)."""
    synopsis, _, rest = description.partition("\n")
    lines = [line.strip() for line in rest.split("\n")]
    long = " ".join(line for line in lines if line and line != ".")
    return " ".join(synopsis.split()), " ".join(long.split())


@dataclasses.dataclass(frozen=True)
class Package:
    name: str
    source: str
    section: str
    md5: str


def read_packages(text: str) -> dict[str, Package]:
    """`Packages` index -> {name: Package}; the source is `Source` without its version."""
    out = {}
    for r in parse_index(text):
        if "Package" not in r or "Description-md5" not in r:
            continue
        source = (r.get("Source") or r["Package"]).split(" ")[0]
        section = r.get("Section", "").rsplit("/", 1)[-1]
        out[r["Package"]] = Package(r["Package"], source, section, r["Description-md5"])
    return out


def read_translations(text: str, language: str) -> dict[str, tuple[str, str]]:
    """`Translation-XX` index -> {Description-md5: (synopsis, long description)}."""
    field = f"Description-{language}"
    out = {}
    for r in parse_index(text):
        if "Description-md5" in r and field in r:
            out[r["Description-md5"]] = split_description(r[field])
    return out


def index_path(lists: pathlib.Path, kind: str) -> pathlib.Path:
    """The bookworm main index of `kind` ('Packages' or a language code) under apt's lists."""
    if kind == "Packages":
        pattern = "*_dists_bookworm_main_binary-amd64_Packages*"
    else:
        pattern = f"*_dists_bookworm_main_i18n_Translation-{kind.replace('_', '%5f')}*"
    found = sorted(p for p in pathlib.Path(lists).glob(pattern) if not p.name.endswith(".diff"))
    if not found:
        raise FileNotFoundError(f"{lists}/{pattern} not found: run apt-get update -o Acquire::Languages=\"en,{kind}\" "
                                "with bookworm main in the sources")
    return found[0]
