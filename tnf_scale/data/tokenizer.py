"""Train an uncased BERT WordPiece tokenizer on the corpus, or load a saved one."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast

from tnf_scale.errors import ConfigError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


MAX_WORD_CHARS = 100  # BERT's WordPiece reads a longer word as [UNK] (max_input_chars_per_word)
LONG_WORD = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}")


def _batches(corpus: datasets.Dataset, max_words: int, left_out: list[int], size: int = 1000) -> Iterator[list[str]]:
    """Every k-th document of the corpus, in batches, k chosen (from the first documents' lengths) so that about
    `max_words` whitespace-separated words are given: a bounded sample spread over the whole corpus. Words longer
    than MAX_WORD_CHARS are left out (counted in `left_out[0]`): WordPiece reads them as [UNK] anyway, and a
    megabyte-long one would keep the trainer busy for hours."""
    head = corpus[:size]["text"]
    words_per_document = sum(len(text.split()) for text in head) / max(len(head), 1)
    stride = max(1, math.ceil(len(corpus) * words_per_document / max_words))
    sample = corpus.select(range(0, len(corpus), stride)) if stride > 1 else corpus
    for start in range(0, len(sample), size):
        texts = sample[start : start + size]["text"]
        left_out[0] += sum(len(LONG_WORD.findall(text)) for text in texts)
        yield [LONG_WORD.sub(" ", text) for text in texts]


def train_wordpiece(corpus: datasets.Dataset, vocab_size: int, sample_words: int, log=print) -> BertTokenizerFast:
    """An uncased WordPiece tokenizer with BERT's normalizer, pre-tokenizer and special tokens, trained on a sample
    of the corpus of about `sample_words` words (the whole corpus when it is smaller)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=True
    )
    left_out = [0]
    tok.train_from_iterator(_batches(corpus, sample_words, left_out), trainer=trainer)
    if left_out[0]:
        log(
            f"tokenizer: {left_out[0]} words longer than {MAX_WORD_CHARS} characters left out of its training "
            "sample (WordPiece reads them as [UNK])"
        )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)  # its export says the model's positions


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A saved fast tokenizer with BERT's special tokens, from a local directory."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
        raise ConfigError(
            f"--tokenizer {path} holds no tokenizer.json or vocab.txt; pass a directory written by "
            f"save_pretrained, or omit --tokenizer to train one."
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tok.is_fast:
        raise ConfigError(
            f"--tokenizer {path} is not a fast tokenizer; TNF needs word ids, so save it with tokenizer.json."
        )
    model = tok.backend_tokenizer.model
    if not isinstance(model, models.WordPiece):
        raise ConfigError(
            f"--tokenizer {path} is a {type(model).__name__} tokenizer; TNF reads words back from their "
            "WordPiece pieces, so give a WordPiece tokenizer (BERT's or ELECTRA's)."
        )
    if not model.continuing_subword_prefix:
        raise ConfigError(
            f"--tokenizer {path} is a WordPiece tokenizer without a continuing-subword prefix (BERT's is '##'); TNF "
            "tells where a word starts by that prefix, so give one that marks its continuation pieces."
        )
    missing = [t for t in ("pad_token", "cls_token", "sep_token", "mask_token", "unk_token") if getattr(tok, t) is None]
    if missing:
        raise ConfigError(
            f"--tokenizer {path} lacks {', '.join(missing)}; TNF pre-training needs BERT's special tokens."
        )
    return tok


def continuation_table(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """For every token id, whether it continues the word before it (a WordPiece piece such as "##ing"): within a
    word WordPiece prefixes every piece but the first, so a token starts a word exactly when it is not one of these."""
    prefix = tokenizer.backend_tokenizer.model.continuing_subword_prefix
    table = np.zeros(len(tokenizer), dtype=bool)
    for token, token_id in tokenizer.get_vocab().items():
        table[token_id] = token.startswith(prefix) and len(token) > len(prefix)
    return table
