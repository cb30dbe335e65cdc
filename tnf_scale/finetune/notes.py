"""TNF at fine-tuning time: the paper's TNF-F and TNF-U variants on a sequence classifier.

  ema      the run's note dictionary is mixed into the rare spans of the task's inputs (the same λ, the same
           seam) and keeps being updated by the EMA rule from the fine-tuning forward passes (TNF-F)
  learned  the note rows are parameters, initialised from the dictionary, trained by back-propagation (TNF-U)

Rare spans are found with the run's own tokenizer and rare vocabulary, as in pre-training: a whole word of
the rare vocabulary, all of its tokens inside the (truncated) input. Fine-tuning masks nothing, so every
occurrence reads its note. The note math, the store and the hooks are pre-training's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, PreTrainedTokenizerFast

from tnf_scale.data.rare_vocab import RareVocab, word_splitter
from tnf_scale.errors import ConfigError
from tnf_scale.model.tnf_bert import TnfHooks
from tnf_scale.notes.store import NoteStore
from tnf_scale.run_dir import RARE_VOCAB_FILE, RunDir
from tnf_scale.spans import expand_spans

VARIANTS = ("none", "ema", "learned")
FINETUNED_NOTES_FILE = "tnf_notes.safetensors"  # beside a fine-tuned model: the note rows and how to use them
NOTES_CONFIG = "tnf_notes.json"
OCCURRENCE_COLUMNS = ("rare_ids", "span_start", "span_end")


def check_notes_belong(model_dir: str | Path, run_dir: str | Path) -> None:
    """TNF-F and TNF-U add --run's notes to --model's word embeddings: the model must be that run's (an export inside
    another run, such as the baseline's beside it, is refused), with the run's tokenizer and width."""
    model, run = Path(model_dir).resolve(), RunDir(run_dir)
    producer = next((p for p in model.parents if RunDir(p).run_config.is_file()), None)
    if producer is not None and producer != run.path.resolve():
        raise ConfigError(
            f"--model {model_dir} was exported from run {producer}, not from --run {run_dir}, whose notes belong to "
            f"its own embeddings; pass --run {producer}, or --notes none."
        )
    width = json.loads((model / "config.json").read_text()).get("hidden_size")
    note_width = run.read_model_config().get("hidden_size") if run.model_config.is_file() else width
    run_words = tokenizer_vocab(run.tokenizer)  # none: the run holds no notes either, which loading them says
    same_words = run_words is None or tokenizer_vocab(model) == run_words
    if width != note_width or not same_words:
        differs = f"hidden size {width}, the notes' {note_width}" if width != note_width else "another tokenizer"
        raise ConfigError(
            f"--model {model_dir} was not trained by --run {run_dir} ({differs}), so the run's notes do not fit it; "
            "pass the run that produced the model, or --notes none."
        )


def tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    """The vocabulary of the tokenizer saved in `folder` (None: it holds no tokenizer.json)."""
    spec = Path(folder) / "tokenizer.json"
    return json.loads(spec.read_text())["model"].get("vocab") if spec.is_file() else None


class NoteSource:
    """A note dictionary with what reading it needs: rows by rare id, the rare vocabulary, λ, γ and k."""

    def __init__(self, rows: torch.Tensor, rare_vocab_file: Path, lam: float, gamma: float, window: int):
        self.rows, self.rare_vocab_file, self.lam, self.gamma, self.window = rows, rare_vocab_file, lam, gamma, window
        self.rare_id_of = RareVocab.load(rare_vocab_file).id_of()

    @classmethod
    def from_run(cls, run_dir: str | Path) -> NoteSource:
        """The dictionary a pre-training run saved (notes.safetensors) with its tokenizer's rare vocabulary."""
        run = RunDir(run_dir)
        if not run.notes.is_file() or not run.rare_vocab.is_file() or not run.run_config.is_file():
            raise ConfigError(
                f"{run.path} holds no note dictionary ({run.notes.name}, {run.rare_vocab.relative_to(run.path)}); "
                "point --run at a TNF pre-training run, or fine-tune with --notes none."
            )
        saved, config = load_file(str(run.notes)), run.read_run_config()
        rows = torch.zeros(len(saved["ids"]), saved["vectors"].shape[1])
        rows[saved["ids"]] = saved["vectors"]
        return cls(rows, run.rare_vocab, config["note_lambda"], config["note_gamma"], config["note_window"])


def occurrence_finder(tokenizer: PreTrainedTokenizerFast, rare_id_of: dict[str, int]):
    """A function (encodings, texts, pairs) -> per example the rare occurrences of the encoded (truncated) input."""
    split = word_splitter(tokenizer)
    pieces: dict[str, int] = {}

    def whole_word_tokens(word: str) -> int:
        if word not in pieces:
            pieces[word] = len(tokenizer(word, add_special_tokens=False)["input_ids"])
        return pieces[word]

    def find(encodings, texts: list[str], pairs: list[str] | None) -> dict[str, list[list[int]]]:
        out = {name: [] for name in OCCURRENCE_COLUMNS}
        for i in range(len(texts)):
            words = (split(texts[i]), split(pairs[i]) if pairs else [])
            extent: dict[tuple[int, int], list[int]] = {}
            for position, (sequence, word) in enumerate(zip(encodings.sequence_ids(i), encodings.word_ids(i))):
                if sequence is not None and word is not None:
                    extent.setdefault((sequence, word), [position, position])[1] = position
            found = [
                (rare_id_of[words[s][w]], a, b)
                for (s, w), (a, b) in extent.items()
                if words[s][w] in rare_id_of and b - a + 1 == whole_word_tokens(words[s][w])
            ]
            for name, column in zip(OCCURRENCE_COLUMNS, zip(*found) if found else ((), (), ())):
                out[name].append(list(column))
        return out

    return find


class NotedCollator:
    """Pads like DataCollatorWithPadding and gathers the rare occurrences as (sample, rare id, start, end) tensors."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        occurrences = [
            (i, r, s, e) for i, f in enumerate(features) for r, s, e in zip(*(f.pop(c) for c in OCCURRENCE_COLUMNS))
        ]
        batch = self.pad(features)
        for k, name in enumerate(("occ_sample", "occ_rare", "occ_start", "occ_end")):
            batch[name] = torch.tensor([o[k] for o in occurrences], dtype=torch.int64)
        return batch


class NotedClassifier(nn.Module):
    """A Hugging Face sequence classifier reading notes at the rare spans of its inputs (variant ema or learned)."""

    def __init__(self, model: nn.Module, source: NoteSource, variant: str, device: torch.device | None = None):
        """`device`: where the ema variant's store lives, the device the classifier trains on (the Trainer's; the
        store is no module state, so moving the model does not move it). Default: the accelerator's current one."""
        super().__init__()
        if variant not in VARIANTS[1:]:
            raise ConfigError(f"--notes {variant} is not a note variant; choose one of {', '.join(VARIANTS)}.")
        self.model, self.variant, self.source = model, variant, source
        if variant == "learned":
            self.notes = nn.Parameter(source.rows.clone())
        else:  # the pre-training store, on one rank: its read and its ordered EMA write
            self.store = NoteStore(
                len(source.rows), source.rows.shape[1], seed=0, init_std=0.0, gamma=source.gamma, device=device
            )
            self.store.load_state_dict(
                {
                    "ids": torch.arange(len(source.rows)),
                    "vectors": source.rows,
                    "noted": torch.ones(len(source.rows), dtype=torch.bool),
                }
            )
        self.hooks = TnfHooks(
            [model.base_model], model.base_model, source.lam, source.window, rows_trainable=variant == "learned"
        )

    def note_rows(self) -> torch.Tensor:
        return self.notes.detach() if self.variant == "learned" else self.store.table

    def forward(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        occ_sample=None,
        occ_rare=None,
        occ_start=None,
        occ_end=None,
    ):
        rows = self.notes[occ_rare] if self.variant == "learned" else self.store.read(occ_rare)
        self.hooks.set_reads(*expand_spans(occ_sample, occ_start, occ_end, input_ids.shape[1]), rows)
        writes = self.variant == "ema" and self.training
        if writes:
            self.hooks.set_capture(occ_sample, occ_start, occ_end, attention_mask.sum(1))
        try:
            output = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels
            )
            pooled = self.hooks.pooled
        finally:
            self.hooks.clear()
        if writes:  # order key: the example's place in the batch, as the order key of a pre-training sample
            self.store.write(occ_rare, occ_sample, occ_start, pooled)
        return output

    def save(self, folder: str | Path) -> None:
        """The classifier as a stock model directory, plus the note rows, the rare vocabulary and λ, γ, k beside it."""
        folder = Path(folder)
        self.model.save_pretrained(str(folder))
        save_file({"vectors": self.note_rows().float().cpu().contiguous()}, str(folder / FINETUNED_NOTES_FILE))
        shutil.copy(self.source.rare_vocab_file, folder / RARE_VOCAB_FILE)
        (folder / NOTES_CONFIG).write_text(
            json.dumps(
                {
                    "variant": self.variant,
                    "note_lambda": self.source.lam,
                    "note_gamma": self.source.gamma,
                    "note_window": self.source.window,
                },
                indent=1,
            )
            + "\n"
        )

    @classmethod
    def load(cls, folder: str | Path) -> NotedClassifier:
        """A classifier `save` wrote, with its notes."""
        folder = Path(folder)
        config = json.loads((folder / NOTES_CONFIG).read_text())
        source = NoteSource(
            load_file(str(folder / FINETUNED_NOTES_FILE))["vectors"],
            folder / RARE_VOCAB_FILE,
            config["note_lambda"],
            config["note_gamma"],
            config["note_window"],
        )
        return cls(AutoModelForSequenceClassification.from_pretrained(str(folder)), source, config["variant"])
