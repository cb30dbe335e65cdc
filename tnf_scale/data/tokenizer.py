"""Train an uncased BERT WordPiece tokenizer on the corpus, or load a saved one."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from tnf_scale.config import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _batches(corpus: datasets.Dataset, size: int = 1000) -> Iterator[list[str]]:
    for start in range(0, len(corpus), size):
        yield corpus[start : start + size]["text"]


def train_wordpiece(corpus: datasets.Dataset, vocab_size: int, max_seq_len: int) -> BertTokenizerFast:
    """An uncased WordPiece tokenizer with BERT's normalizer, pre-tokenizer and special tokens."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=True)
    tok.train_from_iterator(_batches(corpus), trainer=trainer, length=len(corpus))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=max_seq_len)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A saved fast tokenizer with BERT's special tokens, from a local directory."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise ConfigError(f"--tokenizer {path} holds no tokenizer.json or vocab.txt; pass a directory written by save_pretrained, or omit --tokenizer to train one.")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tok.is_fast:
        raise ConfigError(f"--tokenizer {path} is not a fast tokenizer; TNF needs word ids, so save it with tokenizer.json.")
    missing = [t for t in ("pad_token", "cls_token", "sep_token", "mask_token") if getattr(tok, t) is None]
    if missing:
        raise ConfigError(f"--tokenizer {path} lacks {', '.join(missing)}; TNF pre-training needs BERT's special tokens.")
    return tok
