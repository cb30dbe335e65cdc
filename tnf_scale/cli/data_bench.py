"""How fast data preparation is, and how much memory it takes, at the size you ask for.

    python tools/data_bench.py --words 100000000 --num_proc 1 2 --out runs/data_bench

Writes N words of real text (the bundled corpus, repeated) to OUT/corpus.jsonl, then for each --num_proc prepares
it from scratch with `python -m tnf_scale.cli.prepare` (the bench preset's data flags; a fresh cache in OUT, and a
fresh `datasets` cache, so nothing is reused) while sampling the memory of the whole process tree (the preparer and
its workers; PSS, so shared pages count once). Reports each phase's seconds, the count + pack rate (words as
BERT's pre-tokenizer splits them) and two peaks, to data_bench.{md,json}: all memory (PSS), and its anonymous part
(heap and shared memory), which excludes the clean pages of memory-mapped files (Arrow tables, libraries) that the
kernel can drop and read again under pressure.
The repeated corpus has the bundled corpus's vocabulary with every count multiplied: it measures speed and memory,
not the rare band of a real corpus of that size.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tnf_scale.config import BUNDLED_CORPUS, DataSettings, forwarding_parser
from tnf_scale.data.encoding import GROUP, encode_texts
from tnf_scale.data.tokenizer import load_tokenizer
from tnf_scale.errors import ConfigError, command_line
from tnf_scale.run_dir import check_out_dir, machine


def write_corpus(path: Path, words: int) -> int:
    """The bundled corpus repeated until `words` whitespace-separated words; returns how many were written."""
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as src:
        documents = [json.loads(line)["text"] for line in src]
    written = 0
    with path.open("w", encoding="utf-8") as dst:
        while written < words:
            for text in documents:
                dst.write(json.dumps({"text": text}) + "\n")
                written += len(text.split())
                if written >= words:
                    break
    return written


def tree_memory(process: psutil.Process) -> tuple[int, int]:
    """Bytes a process and all its descendants hold now, as (all, anonymous): sums of their proportional set sizes
    (PSS, from /proc/PID/smaps_rollup), so pages they share count once, not once per process as RSS would."""
    total = anonymous = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{member.pid}/smaps_rollup").read_text().splitlines()[1:]
            )
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # the process ended between listing and reading
        kib = {name: int(value.split()[0]) * 1024 for name, value in fields.items()}
        total += kib["Pss"]
        anonymous += kib["Pss_Anon"] + kib["Pss_Shmem"]
    return total, anonymous


def prepare(corpus: Path, cache: Path, num_proc: int, flags: list[str]) -> dict:
    """One preparation from scratch in a child process: its stats.json and the peak memory of its process tree."""
    shutil.rmtree(cache, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "tnf_scale.cli.prepare",
        "--corpus",
        str(corpus),
        "--data_cache",
        str(cache),
        "--num_proc",
        str(num_proc),
        *flags,
    ]
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache / "hf_datasets")}  # nothing reused from an earlier preparation
    child = subprocess.Popen(
        command,
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watched, peak, peak_anonymous, started = psutil.Process(child.pid), 0, 0, time.perf_counter()
    while child.poll() is None:
        try:
            total, anonymous = tree_memory(watched)
        except psutil.NoSuchProcess:
            break
        peak, peak_anonymous = max(peak, total), max(peak_anonymous, anonymous)
        time.sleep(0.2)
    output = child.stdout.read()
    if child.returncode != 0:
        raise ConfigError(
            f"preparing with --num_proc {num_proc} failed (exit {child.returncode}): {output.strip().splitlines()[-1]}"
        )
    stats = json.loads(next(cache.glob("[0-9a-f]*/packed-*/stats.json")).read_text())
    return {
        "num_proc": num_proc,
        "seconds": stats["seconds"],
        "wall_seconds": time.perf_counter() - started,
        "words": stats["words"],
        "peak_memory_gb": peak / 1e9,
        "peak_anonymous_memory_gb": peak_anonymous / 1e9,
    }


def read_texts(corpus: Path) -> list[str]:
    with corpus.open(encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def tokenizer_ceiling(tokenizer_dir: Path, texts: list[str], words: int) -> dict:
    """Words/s of the prepared tokenizer's Rust batch encoder alone, in this process (on every core, as a one-process
    preparation runs it), encoding every text in groups of GROUP documents as preparation encodes them, and nothing
    else; `words` are the words preparation counted in them. Preparation encodes each word once, so count + pack can
    go no faster than this."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    started = time.perf_counter()
    for first in range(0, len(texts), GROUP):
        encode_texts(tokenizer, texts[first : first + GROUP])
    seconds = time.perf_counter() - started
    return {"words": words, "threads": psutil.cpu_count() or 1, "encode_words_per_s": words / seconds}


def render(rows: list[dict], words: int, command: str) -> str:
    phases = list(rows[0]["seconds"])
    lines = [
        f"Data preparation of {words:,} words (the bundled corpus repeated) on {machine()}; `{command}`.",
        "",
        "| --num_proc | "
        + " | ".join(f"{p} s" for p in phases)
        + " | count + pack words/s | tokenizer alone words/s | share of it | peak memory (PSS)"
        + " | peak anonymous memory |",
        "| --- |" + " --- |" * (len(phases) + 5),
    ]
    for row in rows:
        seconds, ceiling = row["seconds"], row["tokenizer_alone"]["encode_words_per_s"]
        rate = row["words"] / max(seconds["count"] + seconds["pack"], 1e-9)
        lines.append(
            f"| {row['num_proc']} | "
            + " | ".join(f"{seconds[p]:.1f}" for p in phases)
            + f" | {rate:,.0f} | {ceiling:,.0f} | {100 * rate / ceiling:.0f}% | {row['peak_memory_gb']:.2f} GB | "
            f"{row['peak_anonymous_memory_gb']:.2f} GB |"
        )
    threads = rows[0]["tokenizer_alone"]["threads"]
    lines += [
        "",
        f"The tokenizer alone: the prepared tokenizer's Rust batch encoder on {threads} threads, in one process, over "
        f"every text in groups of {GROUP} documents (as preparation encodes them) and nothing else, timed right after "
        "each preparation. Preparation encodes every word once (counting and packing share the encoding), so count + "
        "pack cannot pass that rate.",
    ]
    return "\n".join(lines) + "\n"


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "each preparation", (DataSettings,))
    parser.add_argument("--words", type=int, default=10_000_000, help="words of text to prepare")
    parser.add_argument("--num_proc", type=int, nargs="+", default=[1, psutil.cpu_count() or 1])
    parser.add_argument("--out", default="runs/data_bench")
    args, flags = parser.parse_known_args(argv)
    if args.words < 1 or min(args.num_proc) < 1:
        raise ConfigError("--words and every --num_proc must be at least 1.")
    out = check_out_dir(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    words = write_corpus(corpus, args.words)
    texts, rows = read_texts(corpus), []
    for n in args.num_proc:  # the ceiling is timed beside each preparation: this machine's speed drifts
        row = prepare(corpus, out / f"cache_{n}", n, ["--preset", "bench", *flags])
        tokenizer = next((out / f"cache_{n}").glob("[0-9a-f]*/tokenizer"))
        row["tokenizer_alone"] = tokenizer_ceiling(tokenizer, texts, row["words"])
        rows.append(row)
    command = " ".join(["python", "tools/data_bench.py", *(argv if argv is not None else sys.argv[1:])])
    text = render(rows, words, command)
    (out / "data_bench.md").write_text(text)
    (out / "data_bench.json").write_text(
        json.dumps({"words": words, "machine": machine(), "command": command, "runs": rows}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
