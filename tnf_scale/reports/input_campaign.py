"""A campaign of bad inputs: each case runs one command of the project on one mistake and is judged on three counts.

- **hang**: the command did not end within its timeout;
- **data loss**: a run directory the case points at (a run of the project, or its own training run) changed;
- **one sentence**: exit status 2, no traceback, and one line on stderr besides the libraries' own log lines.

The cases are grouped in classes (training flags, corpus files, DeepSpeed configs, resumes, fine-tuning, tools).
The resume and fine-tuning cases need a finished run, which the campaign trains once (tiny preset, a few steps)
on a slice of the bundled corpus.
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tnf_scale.config import BUNDLED_CORPUS, REPO

# Lines the libraries print on their own (DeepSpeed's accelerator and op notices, warnings, datasets' and
# transformers' progress bars): not the refusal.
LIBRARY_LINE = re.compile(
    r"^\[?(\d{4}-\d\d-\d\d |W\d{4} |\[?(WARNING|INFO)\]?)|^\s*warnings\.warn|Warning:|(\d+(\.\d+)?|\?)\s?\w+/s\]$"
)
TIMEOUT = 180


@dataclass
class Case:
    """One bad input: the class it belongs to, what is wrong, the command's arguments after `python -m`, and the
    run directory that must not change (None: the case's own output folder must stay absent or as it was)."""

    cls: str
    name: str
    argv: Callable[[Path], list[str]]
    watched: Callable[[Path], Path] | None = None


@dataclass
class Outcome:
    case: Case
    status: int | None  # None: timed out
    refusal: str
    traceback: bool
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def hung(self) -> bool:
        return self.status is None

    @property
    def one_sentence(self) -> bool:
        return self.status == 2 and not self.traceback and self.refusal.count("\n") == 0 and bool(self.refusal)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def refusal_of(stderr: str) -> str:
    """The lines of stderr that are not the libraries' own log lines."""
    return "\n".join(line for line in stderr.splitlines() if line.strip() and not LIBRARY_LINE.search(line))


def run_case(case: Case, work: Path) -> Outcome:
    """Run one case from the repository root and judge it."""
    watched = case.watched(work) if case.watched else None
    before = snapshot(watched) if watched else {}
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", *case.argv(work)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT
        )
        # a refusal printed on stdout (a tool whose stderr stayed empty) still counts as what it said
        status, stderr = proc.returncode, proc.stderr or (proc.stdout if proc.returncode else "")
    except subprocess.TimeoutExpired as err:
        status, stderr = None, (err.stderr or b"").decode(errors="replace")  # bytes even under text=True
    seconds = time.perf_counter() - start
    after = snapshot(watched) if watched else {}
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    return Outcome(case, status, refusal_of(stderr), "Traceback" in stderr, changed, seconds)


def victim_run(work: Path) -> Path:
    """A run directory of this project that a mistaken --overwrite would delete."""
    return work / "victim"


def make_victim(work: Path) -> None:
    """The victim run, made anew."""
    run = victim_run(work)
    shutil.rmtree(run, ignore_errors=True)
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    (run / "run_config.json").write_text("{}\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    (run / "checkpoints" / "step00000002" / "weights.pt").write_bytes(b"weights")


def small_corpus(work: Path, documents: int = 1500, skip: int = 0) -> Path:
    """The first `documents` documents (after `skip`) of the bundled corpus, as JSON lines."""
    out = work / f"corpus-{skip}-{documents}.jsonl"
    if not out.is_file():
        with lzma.open(BUNDLED_CORPUS, "rt") as f:
            lines = [line for _, line in zip(range(skip + documents), f)][skip:]
        out.write_text("".join(lines))
    return out


def train(work: Path, *flags: str, output: Path | None = None) -> list[str]:
    """`tnf_scale.train` on the campaign's corpus and cache into `output` (default: over the victim run)."""
    out = output or victim_run(work)
    return [
        "tnf_scale.train",
        "--corpus", str(small_corpus(work)), "--data_cache", str(work / "cache"), "--output_dir", str(out),
        "--vocab_size", "2000", "--max_steps", "4", "--eval_interval", "2", "--save_interval", "2",
        "--global_batch_size", "8", "--micro_batch_size", "8", "--eval_sequences", "8",
        *([] if output else ["--overwrite", "true"]),
        *flags,
    ]  # fmt: skip


def trained_run(work: Path) -> Path:
    return work / "trained"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def ds_file(work: Path, name: str, content: str) -> str:
    return str(write(work / "ds" / name, content))


def corpus_case(name: str, make: Callable[[Path], Path]) -> Case:
    """A training run over the victim whose --corpus is the file or folder `make` writes."""
    return Case("corpus files", name, lambda w: [*train(w), "--corpus", str(make(w))], victim_run)


def flag_case(name: str, *flags: str) -> Case:
    return Case("training flags", name, lambda w: train(w, *flags), victim_run)


def ds_case(name: str, content: str) -> Case:
    return Case(
        "DeepSpeed configs",
        name,
        lambda w: train(w, "--deepspeed_config", ds_file(w, f"{name.split()[0]}.json", content)),
        victim_run,
    )


def resume_case(name: str, *flags: str) -> Case:
    return Case("resumes", name, lambda w: train(w, "--resume", "true", *flags, output=trained_run(w)), trained_run)


def finetune(work: Path, *flags: str, model: Path | None = None) -> list[str]:
    """`tnf_scale.cli.finetune` of the trained run's export (or `model`) on the shipped task, unless `flags` name
    local files or another task, into the victim run."""
    task = [] if "--train" in flags or "--task" in flags else ["--task", "rotten_tomatoes"]
    return [
        "tnf_scale.cli.finetune",
        "--model", str(model or trained_run(work) / "export"), *task,
        "--seeds", "1", "--epochs", "1", "--max_train_examples", "16", "--max_eval_examples", "16",
        "--out", str(victim_run(work) / "finetune"),
        *flags,
    ]  # fmt: skip


def finetune_case(name: str, argv: Callable[[Path], list[str]]) -> Case:
    return Case("fine-tuning", name, argv, victim_run)


def tool_case(name: str, argv: Callable[[Path], list[str]]) -> Case:
    return Case("tools", name, argv, victim_run)


def with_two_ids_swapped(tokenizer: Path, folder: Path) -> Path:
    """A copy of the saved `tokenizer` in `folder` in which two tokens swap ids: the same words, read as other ids."""
    shutil.copytree(tokenizer, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[20:22]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def other_tokenizer(work: Path) -> Path:
    """The trained run's tokenizer with two tokens' ids swapped."""
    folder = work / "other_tokenizer"
    return folder if folder.is_dir() else with_two_ids_swapped(trained_run(work) / "tokenizer", folder)


CASES = [
    flag_case("no steps", "--max_steps", "0"),
    flag_case("negative learning rate", "--lr=-1e-4"),
    flag_case("learning rate NaN", "--lr", "nan"),
    flag_case("negative warm-up", "--warmup_steps", "-3"),
    flag_case("masking nothing", "--mlm_probability", "0"),
    flag_case("note lambda above 1", "--note_lambda", "1.5"),
    flag_case("negative note window", "--note_window=-1"),
    flag_case("unknown precision", "--precision", "fp8"),
    flag_case("unknown objective", "--objective", "gpt"),
    flag_case("unknown preset", "--preset", "bert-huge"),
    flag_case("sequence longer than the positions", "--max_seq_len", "1024"),
    flag_case("hidden size not divisible by heads", "--hidden_size", "30", "--num_heads", "4"),
    flag_case("micro-batch 0", "--micro_batch_size", "0"),
    flag_case("rare band upside down", "--rare_min_count", "10", "--rare_max_count", "5"),
    flag_case("negative save interval", "--save_interval=-5"),
    flag_case("a flag without its value", "--max_steps"),
    flag_case("a number flag given a word", "--max_steps", "ten"),
    Case(
        "training flags",
        "data cache is a file",
        lambda w: train(w, "--data_cache", str(write(w / "cache.txt", "x"))),
        victim_run,
    ),  # fmt: skip
    Case(
        "training flags",
        "tokenizer folder missing",
        lambda w: train(w, "--tokenizer", str(w / "no_tokenizer")),
        victim_run,
    ),  # fmt: skip
    Case("training flags", "init_from missing", lambda w: train(w, "--init_from", str(w / "no_model")), victim_run),
    Case("training flags", "config file missing", lambda w: train(w, "--config", str(w / "none.yaml")), victim_run),
    Case(
        "training flags",
        "config file with an unknown key",
        lambda w: train(w, "--config", str(write(w / "bad.yaml", "max_step: 10\n"))),
        victim_run,
    ),  # fmt: skip
    corpus_case("empty folder", lambda w: (w / "empty_folder").mkdir(exist_ok=True) or w / "empty_folder"),
    corpus_case("a .csv file", lambda w: write(w / "corpus.csv", "text\nhello world\n")),
    corpus_case("jsonl without a text column", lambda w: write(w / "body.jsonl", '{"body": "hello"}\n' * 50)),
    corpus_case("plain text named .gz", lambda w: write(w / "plain.jsonl.gz", '{"text": "hello"}\n' * 50)),
    corpus_case("folder holding only a README", lambda w: write(w / "readme_only" / "README.md", "# data\n").parent),
    corpus_case("truncated parquet", lambda w: write(w / "cut.parquet", b"PAR1\x15\x04\x15")),
    corpus_case("a JSON object, not records", lambda w: write(w / "object.json", '{"text": 5, "other": [1, 2]}')),
    ds_case("invalid JSON", '{"zero_optimization": {"stage": 1,}}'),
    ds_case("ZeRO stage 7", json.dumps({"zero_optimization": {"stage": 7}})),
    ds_case("batch sizes that disagree", json.dumps({"train_batch_size": 12})),
    ds_case("pipeline stages true", json.dumps({"pipeline": {"stages": True}})),
    ds_case("a list, not an object", "[1, 2]"),
    resume_case("another hidden size", "--hidden_size", "64", "--num_heads", "2"),
    resume_case("another tokenizer", "--tokenizer", "{other_tokenizer}"),
    resume_case("fewer steps than the checkpoint", "--max_steps", "1"),
    resume_case("another corpus", "--corpus", "{other_corpus}"),
    resume_case("notes turned off", "--tnf", "off"),
    finetune_case("sequence beyond the model's positions", lambda w: finetune(w, "--max_seq_len", "1024")),
    finetune_case("a run folder, not a model", lambda w: finetune(w, model=trained_run(w))),
    finetune_case("unknown task", lambda w: finetune(w, "--task", "glue_nonexistent")),
    finetune_case("epochs 0", lambda w: finetune(w, "--epochs", "0")),
    finetune_case(
        "learned notes of another run",
        lambda w: finetune(w, "--notes", "learned", "--run", str(victim_run(w))),
    ),
    finetune_case(
        "a CSV row without text",
        lambda w: finetune(
            w,
            "--train",
            str(write(w / "ft.csv", "text,label\ngood,1\n,0\nbad,0\n")),
            "--validation",
            str(write(w / "ft_dev.csv", "text,label\ngood,1\nbad,0\n")),
        ),  # fmt: skip
    ),
    tool_case(
        "export of a checkpoint that does not exist",
        lambda w: [
            "tnf_scale.cli.export",
            "--run",
            str(trained_run(w)),
            "--checkpoint",
            "step99999999",
            "--out",
            str(victim_run(w) / "export"),
        ],
    ),  # fmt: skip
    tool_case("notes of a run without notes", lambda w: ["tnf_scale.cli.inspect_notes", str(victim_run(w))]),
    tool_case(
        "a sweep axis without values",
        lambda w: ["tnf_scale.cli.tnf_sweep", "--out", str(victim_run(w)), "--grid", "note_lambda"],
    ),  # fmt: skip
    tool_case("throughput of a missing run", lambda w: ["tnf_scale.cli.throughput_report", "--run", str(w / "nope")]),
    tool_case(
        "time to loss with a missing TNF run",
        lambda w: [
            "tnf_scale.cli.time_to_loss",
            "--baseline",
            str(trained_run(w)),
            "--tnf",
            str(w / "nope"),
            "--out",
            str(victim_run(w)),
        ],
    ),  # fmt: skip
    tool_case("preparing a missing corpus", lambda w: ["tnf_scale.cli.prepare", "--corpus", str(w / "none.jsonl")]),
    tool_case(
        "a hostfile with a word for slots",
        lambda w: ["tnf_scale.cli.preflight", "--hostfile", str(write(w / "hosts", "localhost slots=two\n"))],
    ),
]


def expand(argv: list[str], work: Path) -> list[str]:
    """Fill the placeholders a case's arguments may hold (files made from the trained run)."""
    fill = {"{other_tokenizer}": lambda: str(other_tokenizer(work)), "{other_corpus}": lambda: str(
        small_corpus(work, skip=1500))}  # fmt: skip
    return [fill[a]() if a in fill else a for a in argv]


def prepare_work(work: Path, log=print) -> None:
    """The victim run and the trained run the cases point at (trained once, kept between campaigns)."""
    make_victim(work)
    if not (trained_run(work) / "export" / "config.json").is_file():
        log("training the run the resume and fine-tuning cases use")
        proc = subprocess.run(
            [sys.executable, "-m", *train(work, output=trained_run(work))], cwd=REPO, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the campaign's run failed:\n{proc.stderr[-3000:]}")


def run_campaign(work: Path, log=print) -> list[Outcome]:
    """Every case, in order, each against a fresh victim run."""
    prepare_work(work, log)
    outcomes = []
    for case in CASES:
        make_victim(work)
        bound = Case(case.cls, case.name, lambda w, c=case: expand(c.argv(w), w), case.watched)
        outcome = run_case(bound, work)
        outcomes.append(outcome)
        verdict = "hang" if outcome.hung else "one sentence" if outcome.one_sentence else f"exit {outcome.status}"
        log(f"{case.cls} / {case.name}: {verdict}{' DATA CHANGED' if outcome.changed else ''}")
    return outcomes


def summary(outcomes: list[Outcome]) -> dict:
    """Counts per class and overall."""
    classes: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = classes.setdefault(o.case.cls, {"cases": 0, "one_sentence": 0, "hangs": 0, "data_changed": 0})
        row["cases"] += 1
        row["one_sentence"] += o.one_sentence
        row["hangs"] += o.hung
        row["data_changed"] += bool(o.changed)
    total = {k: sum(row[k] for row in classes.values()) for k in ("cases", "one_sentence", "hangs", "data_changed")}
    return {"classes": classes, "total": total}


def table_cell(text: str, width: int = 300) -> str:
    """`text` on one line of a markdown table."""
    return text.replace("|", "/").replace("\n", " // ")[:width]


def write_report(outcomes: list[Outcome], out: Path, commit: str) -> Path:
    """input_campaign.md and input_campaign.json in `out`."""
    counts = summary(outcomes)
    out.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "class": o.case.cls,
            "case": o.case.name,
            "exit": o.status,
            "one_sentence": o.one_sentence,
            "traceback": o.traceback,
            "data_changed": o.changed,
            "said": o.refusal,
            "seconds": round(o.seconds, 1),
        }
        for o in outcomes
    ]
    (out / "input_campaign.json").write_text(
        json.dumps({"commit": commit, **counts, "cases": records}, indent=1) + "\n"
    )
    total = counts["total"]
    lines = [
        f"# Bad-input campaign at {commit}",
        "",
        f"{total['cases']} cases: {total['one_sentence']} one-sentence refusals "
        f"({100 * total['one_sentence'] / total['cases']:.0f}%), {total['hangs']} hangs, "
        f"{total['data_changed']} with a watched run changed.",
        "",
        "| class | cases | one sentence | hangs | data changed |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {name} | {row['cases']} | {row['one_sentence']} | {row['hangs']} | {row['data_changed']} |"
            for name, row in counts["classes"].items()
        ),
        "",
        "| class | case | exit | what it said |",
        "| --- | --- | --- | --- |",
        *(f"| {r['class']} | {r['case']} | {r['exit']} | {table_cell(r['said'])} |" for r in records),
    ]
    (out / "input_campaign.md").write_text("\n".join(lines) + "\n")
    return out / "input_campaign.md"
