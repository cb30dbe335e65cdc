"""What a run's notes learned, without writing code: for a sample of rare words, the vocabulary tokens nearest (by
cosine) to each word's note and to the word's own input embedding, the note's norm and how far it moved between the
run's last two checkpoints; and, per step, the share of rare occurrences that read a note.

A note is mixed into the input embeddings of its word's tokens (docs/design.md, "Read"), so it lives in the space of the
word-embedding table: a note that carries its word's context sits near the tokens of that context, one that carries
nothing near no token in particular. Only words the run noted at least once are sampled (the others still hold their
random initial note).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModel

from tnf_scale.checkpoint import CheckpointMarker, complete_checkpoints, read_rank_files, union_of_ranks
from tnf_scale.data.rare_vocab import RareVocab
from tnf_scale.data.tokenizer import load_tokenizer
from tnf_scale.errors import ConfigError
from tnf_scale.metrics import read_metrics
from tnf_scale.reports.bench import finished_run
from tnf_scale.run_dir import RunDir


@dataclass
class WordNote:
    word: str
    rare_id: int
    count: int  # occurrences in the corpus
    note_norm: float
    embedding_norm: float  # of the word's own input embedding (the mean of its tokens')
    note_to_embedding: float  # cosine between the two
    moved: float | None  # |note at the last checkpoint - note at the one before| / |note before| (None: one checkpoint)
    note_neighbours: list[tuple[str, float]]
    embedding_neighbours: list[tuple[str, float]]


def checkpoint_rows(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, noted) of every rare id, in id order, from a checkpoint's per-rank note files."""
    rows = union_of_ranks(read_rank_files(ckpt, CheckpointMarker.read(ckpt).world_size))
    order = torch.argsort(rows["ids"])
    return rows["vectors"][order].float(), rows["noted"][order]


def nearest(vector: torch.Tensor, table: torch.Tensor, names: list[str], skip: set[int], k: int):
    """The `k` rows of `table` nearest to `vector` by cosine (rows in `skip` left out), as (name, cosine)."""
    cosine = F.normalize(table, dim=1) @ F.normalize(vector, dim=0)
    cosine[list(skip)] = -2.0
    values, index = torch.topk(cosine, k)
    return [(names[i], round(float(v), 4)) for v, i in zip(values, index.tolist())]


def read_share(run: Path) -> list[tuple[int, float]]:
    """Per logged step, the share of the step's rare occurrences that read a note (the others held a masked token)."""
    shares = []
    for record in read_metrics(run):
        read, skipped = record.get("occurrences_read"), record.get("occurrences_skipped_masked")
        if read is not None and skipped is not None and read + skipped > 0:
            shares.append((record["step"], read / (read + skipped)))
    return shares


def inspect(run_dir: Path, words: list[str] | None, sample: int, neighbours: int) -> dict:
    """The figures of the report (see the module docstring), as plain data."""
    run = RunDir(finished_run(run_dir, "RUN"))
    if not run.notes.is_file():
        raise ConfigError(f"{run.path} holds no {run.notes.name}: a --tnf off run has no notes to inspect.")
    if not (run.export / "config.json").is_file():
        raise ConfigError(f"{run.path} has no export; make one first (python tools/export.py --run {run.path}).")
    done = complete_checkpoints(run.path)
    if not done:
        raise ConfigError(f"{run.path} holds no complete checkpoint, which records which words were noted.")
    rare = RareVocab.load(run.rare_vocab)
    tokenizer = load_tokenizer(run.tokenizer)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the export's MLM head is not AutoModel's: no load report for that
    try:
        table = AutoModel.from_pretrained(str(run.export)).get_input_embeddings().weight.detach().float()
    finally:
        transformers.logging.set_verbosity(verbosity)
    vectors, noted = checkpoint_rows(done[-1])
    before = checkpoint_rows(done[-2])[0] if len(done) > 1 else None
    if words:
        unknown = [w for w in words if w not in rare.words]
        if unknown:
            raise ConfigError(f"{unknown[0]!r} is not one of the run's rare words ({run.rare_vocab}); name one listed.")
        chosen = [rare.words.index(w) for w in words]
    else:  # the most frequent noted rare words (the vocabulary lists them by descending count)
        chosen = [i for i in range(len(rare.words)) if noted[i]][:sample]
    names = tokenizer.convert_ids_to_tokens(list(range(len(table))))
    special = set(tokenizer.all_special_ids)
    notes = []
    for i in chosen:
        pieces = tokenizer(rare.words[i], add_special_tokens=False)["input_ids"]
        own, note = table[pieces].mean(dim=0), vectors[i]
        moved = None if before is None else float((note - before[i]).norm() / before[i].norm().clamp_min(1e-12))
        notes.append(
            WordNote(
                word=rare.words[i],
                rare_id=i,
                count=rare.counts[i],
                note_norm=round(float(note.norm()), 4),
                embedding_norm=round(float(own.norm()), 4),
                note_to_embedding=round(float(F.cosine_similarity(note, own, dim=0)), 4),
                moved=None if moved is None else round(moved, 4),
                note_neighbours=nearest(note, table, names, special, neighbours),
                embedding_neighbours=nearest(own, table, names, special, neighbours),
            )
        )
    steps = [CheckpointMarker.read(c).step for c in done[-2:]]
    return {
        "run": str(run.path),
        "checkpoints": steps,
        "noted_words": int(noted.sum()),
        "rare_words": len(rare.words),
        "words": [asdict(n) for n in notes],
        "read_share": read_share(run.path),
    }


def markdown(report: dict) -> str:
    steps = report["checkpoints"]
    moved_between = (
        f"between the checkpoints at steps {steps[0]} and {steps[1]} (relative)"
        if len(steps) == 2
        else f"(n/a: the run kept one checkpoint, at step {steps[0]})"
    )
    lines = [
        f"# What the notes of {report['run']} learned",
        "",
        f"{report['noted_words']} of {report['rare_words']} rare words were noted at least once. For each word "
        "below: the vocabulary tokens nearest (cosine) to its note and to its own input embedding (the mean of its "
        f"tokens'), the note's norm, and how far it moved {moved_between}.",
        "",
        "| word (count) | note norm | note · own | moved | nearest to the note | nearest to the word's embedding |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for w in report["words"]:
        near = ", ".join(f"{t} {c:.2f}" for t, c in w["note_neighbours"])
        own = ", ".join(f"{t} {c:.2f}" for t, c in w["embedding_neighbours"])
        moved = "n/a" if w["moved"] is None else f"{w['moved']:.3f}"
        lines.append(
            f"| {w['word']} ({w['count']}) | {w['note_norm']:.3f} | {w['note_to_embedding']:+.3f} | {moved} | "
            f"{near} | {own} |"
        )
    share = report["read_share"]
    if share:
        mean = sum(s for _, s in share) / len(share)
        lines += [
            "",
            f"Rare occurrences that read a note: {100 * mean:.1f}% on average over {len(share)} logged steps (the "
            "others held a masked token and read none); per step in read_share.png.",
        ]
    return "\n".join(lines) + "\n"


def plot_read_share(share: list[tuple[int, float]], path: Path, about: str) -> None:
    """PNG: the share of rare occurrences that read a note at each logged step; `about` names the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s for s, _ in share], [100 * v for _, v in share], linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("rare occurrences reading a note (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Notes read per step: {about}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, out: Path, words: list[str] | None, sample: int, neighbours: int) -> str:
    """inspect_notes.md, .json and read_share.png into `out`; returns the markdown."""
    report = inspect(run_dir, words, sample, neighbours)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect_notes.json").write_text(json.dumps(report, indent=1) + "\n")
    if report["read_share"]:
        plot_read_share(report["read_share"], out / "read_share.png", RunDir(run_dir).caption())
    text = markdown(report)
    (out / "inspect_notes.md").write_text(text)
    return text
