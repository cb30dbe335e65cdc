"""A domain corpus for continued pre-training: the text of a Debian documentation package's HTML manual, one
document per page, as .jsonl ({"text": ...}).

    apt-get install postgresql-doc-15
    python tools/build_domain_corpus.py --html /usr/share/doc/postgresql-doc-15/html --out runs/domain/postgresql.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

SKIPPED_TAGS = {"script", "style", "head", "pre"}  # code listings and page furniture are not prose


class PageText(HTMLParser):
    """The visible prose of one HTML page, paragraphs kept apart."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag in SKIPPED_TAGS:
            self.skipping += 1
        elif tag in ("p", "li", "dt", "dd", "h1", "h2", "h3", "td", "br", "div"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIPPED_TAGS and self.skipping:
            self.skipping -= 1

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        lines = (re.sub(r"\s+", " ", line).strip() for line in "".join(self.parts).split("\n"))
        return "\n".join(line for line in lines if len(line.split()) >= 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", required=True, type=Path, help="the folder of the manual's .html pages")
    parser.add_argument("--out", required=True, type=Path, help="the .jsonl file to write")
    args = parser.parse_args(argv)
    pages = sorted(args.html.glob("*.html"))
    if not pages:
        print(f"error: {args.html} holds no .html pages; install the documentation package first.", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    words = 0
    with args.out.open("w", encoding="utf-8") as out:
        for page in pages:
            reader = PageText()
            reader.feed(page.read_text(encoding="utf-8", errors="replace"))
            text = reader.text()
            if text:
                words += len(text.split())
                out.write(json.dumps({"text": text}) + "\n")
    print(f"{args.out}: {len(pages)} pages, {words:,} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
