"""Shared fixtures: a small slice of the bundled (real) corpus, prepared once per session."""
from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest

from tnf_scale.config import BUNDLED_CORPUS, RunConfig

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


def corpus_slice(path: Path, max_words: int, sources: tuple[str, ...] = ("wikipedia", "kjv")) -> Path:
    """The first documents of each named source of the bundled corpus, up to max_words in all."""
    per_source = max_words // len(sources)
    taken = {s: 0 for s in sources}
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as src, path.open("w", encoding="utf-8") as dst:
        for line in src:
            doc = json.loads(line)
            if doc["source"] in taken and taken[doc["source"]] < per_source:
                taken[doc["source"]] += len(doc["text"].split())
                dst.write(json.dumps({"text": doc["text"]}) + "\n")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return corpus_slice(tmp_path_factory.mktemp("corpus") / "small.jsonl", 60_000)


@pytest.fixture(scope="session")
def small_config(small_corpus, tmp_path_factory) -> RunConfig:
    """The tiny preset on the small corpus, with a tokenizer small enough to train in seconds."""
    return RunConfig(corpus=[str(small_corpus)], data_cache=str(tmp_path_factory.mktemp("data_cache")),
                     vocab_size=2000, max_seq_len=64, rare_coverage=0.05, eval_fraction=0.05)


@pytest.fixture(scope="session")
def prepared(small_config):
    from tnf_scale.data.prepare import prepare_data

    return prepare_data(small_config, log=lambda *_: None, show_progress=False)
