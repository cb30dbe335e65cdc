"""ELECTRA's replaced-token detection (docs/electra.md) behind the objective seam.

Hugging Face's `ElectraForMaskedLM` (the generator) and `ElectraForPreTraining` (the discriminator) are used as they
are. The generator, smaller by --generator_fraction, predicts the masked tokens; each masked position is filled with
a token sampled from its output by inverse CDF with the collator's per-token uniform (drawn from the (seed, epoch,
order key) generator, so the filled sequence is the same on any rank and in any micro-batch); the discriminator
judges every real position original or replaced (a sample equal to the original counts as original). Word, position
and token-type embeddings are one set of tables shared by both networks; each keeps its own embedding LayerNorm, the
note seam. Notes are written from the discriminator's last layer and read by the network(s) --notes_in names (the
generator by default): a span holding a masked position reads none (every replaced token sits at a masked position).
Discriminator reads are an option for runs whose notes stay at fine-tuning: judged at every position, the
discriminator learns to lean on a note that stands only where a rare word is intact (`notes_in_warning`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining, PreTrainedTokenizerFast

from tnf_scale.config import ELECTRA_NOTES_IN, RunConfig
from tnf_scale.data.batch import IGNORE_INDEX, Batch
from tnf_scale.model.objective import LossSums, Objective, eval_loss_metrics, token_cross_entropy

SHARED_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
GENERATOR, DISCRIMINATOR, DISCRIMINATOR_ERROR, REPLACED = range(4)  # the loss terms, in `forward`'s order


def electra_configs(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> tuple[ElectraConfig, ElectraConfig]:
    """(generator, discriminator) configs: the discriminator's shape from the preset, the generator's scaled by
    --generator_fraction, one embedding width (the discriminator's hidden size) for both."""
    common = dict(
        vocab_size=len(tokenizer),
        embedding_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    hidden, heads, ffn = cfg.generator_shape
    generator = ElectraConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=ffn, **common)
    discriminator = ElectraConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        **common,
    )
    return generator, discriminator


def share_embeddings(generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining) -> None:
    """Make the generator use the discriminator's embedding tables (one tensor each), its output layer tied to them."""
    for name in SHARED_EMBEDDINGS:
        setattr(generator.electra.embeddings, name, getattr(discriminator.electra.embeddings, name))
    generator.tie_weights()


def build_electra(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> ElectraObjective:
    """A freshly initialised ELECTRA objective; the same seed gives the same weights."""
    generator_config, discriminator_config = electra_configs(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    discriminator = ElectraForPreTraining(discriminator_config)
    generator = ElectraForMaskedLM(generator_config)
    return ElectraObjective(generator, discriminator, cfg.rtd_weight, cfg.notes_in)


def notes_in_warning(cfg: RunConfig) -> str | None:
    """The start-up warning of an ELECTRA run whose --notes_in matters less than it seems (None for any other run):
    the discriminator reads notes, or a baseline was given a non-default --notes_in that it cannot act on."""
    if cfg.objective != "electra" or cfg.notes_in == ELECTRA_NOTES_IN:
        return None
    if not cfg.tnf_enabled:
        return f"warning: --notes_in {cfg.notes_in} does nothing with --tnf off: a baseline reads no notes"
    return (
        f"warning: --notes_in {cfg.notes_in}: the discriminator reads notes and learns to lean on them, so its "
        "exported model, which has no notes, ends worse than the baseline on rare spans (docs/electra.md, "
        "'ELECTRA with notes'); keep them for fine-tuning (tools/finetune.py --notes ema|learned), or use the "
        "default --notes_in generator"
    )


def sample_replacements(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits`, drawn from softmax(logits) by inverse CDF with the row's uniform in [0, 1)."""
    cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
    return torch.searchsorted(cdf, uniform.float()[:, None].contiguous()).squeeze(1).clamp_(max=logits.shape[-1] - 1)


class ElectraObjective(Objective):
    """Generator MLM + rtd_weight x discriminator loss; the discriminator's error and the replaced share ride along
    with weight 0, so that steps and evaluations report them summed over the global batch like the losses.

    Terms (see `term_index`): generator cross-entropy at masked positions; discriminator binary cross-entropy,
    and its error (0/1), at every real position; replaced (0/1) at masked positions. The held-out discriminator
    loss is logged as `eval_loss_no_notes` / `eval_loss_notes` (split into rare-span and other positions), the
    names the reports read, beside `eval_disc_accuracy*` and `eval_gen_loss*`.
    """

    def __init__(
        self, generator: ElectraForMaskedLM, discriminator: ElectraForPreTraining, rtd_weight: float, notes_in: str
    ):
        super().__init__()
        share_embeddings(generator, discriminator)
        self.generator, self.discriminator, self.notes_in = generator, discriminator, notes_in
        self.model_config, self.generator_config = discriminator.config, generator.config
        self.term_weights = (1.0, rtd_weight, 0.0, 0.0)

    def note_readers(self) -> list[nn.Module]:
        readers = {
            "discriminator": [self.discriminator],
            "generator": [self.generator],
            "both": [self.generator, self.discriminator],
        }
        return [network.electra for network in readers[self.notes_in]]

    def note_writer(self) -> nn.Module:
        return self.discriminator.electra

    def term_index(self, batch: Batch) -> list[torch.Tensor]:
        masked, real = batch.predicted_index, batch.real_index
        return [masked, real, real, masked]

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.model_attention_mask,
            "labels": batch.labels,
            "sample_uniform": batch.sample_uniform,
            "predicted_index": batch.predicted_index,
            "real_index": batch.real_index,
        }

    def step_metrics(self, term_means: list[float]) -> dict[str, float]:
        return {
            "loss_generator": term_means[GENERATOR],
            "loss_discriminator": term_means[DISCRIMINATOR],
            "replaced_share": term_means[REPLACED],
        }

    def eval_metrics(self, plain: list[LossSums], with_notes: list[LossSums] | None) -> dict[str, float]:
        result = eval_loss_metrics(plain[DISCRIMINATOR], with_notes[DISCRIMINATOR] if with_notes else None)
        for suffix, sums in (("no_notes", plain), ("notes", with_notes)):
            if sums is None:
                continue
            result.update(
                {
                    key.replace("error", "accuracy"): 1.0 - value
                    for key, value in sums[DISCRIMINATOR_ERROR].losses(f"eval_disc_error_{suffix}").items()
                }
            )
            result.update(sums[GENERATOR].losses(f"eval_gen_loss_{suffix}"))
        return result

    def filled(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        predicted_index: torch.Tensor,
        generator_logits: torch.Tensor,
        sample_uniform: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The discriminator's input (masked positions filled with samples) and where it differs from the original."""
        original = torch.where(labels != IGNORE_INDEX, labels, input_ids)
        samples = sample_replacements(generator_logits.detach(), sample_uniform.flatten()[predicted_index])
        filled = original.flatten().index_copy(0, predicted_index, samples).view_as(original)
        return filled, filled != original

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        sample_uniform: torch.Tensor,
        predicted_index: torch.Tensor,
        real_index: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        hidden = self.generator.electra(input_ids=input_ids, attention_mask=attention_mask)[0]
        masked_hidden = hidden.flatten(0, 1)[predicted_index]
        logits = self.generator.generator_lm_head(self.generator.generator_predictions(masked_hidden))
        filled, replaced = self.filled(input_ids, labels, predicted_index, logits, sample_uniform)
        judged = self.discriminator(input_ids=filled, attention_mask=attention_mask).logits.flatten()[real_index]
        replaced = replaced.flatten()
        return (
            token_cross_entropy(logits, labels.flatten()[predicted_index]),
            F.binary_cross_entropy_with_logits(judged.float(), replaced[real_index].float(), reduction="none"),
            ((judged > 0) != replaced[real_index]).float(),
            replaced[predicted_index].float(),
        )
