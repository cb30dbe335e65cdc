"""bf16 end to end, as every GPU run takes it, on this CPU's native bf16: ZeRO 1/2/3 and pipeline stages train,
resume on another world size and export the fp32 master weights (never their bf16 rounding).

Tolerance for runs that differ in world size: the micro-batches (4 sequences) are the same on 1 and 2 ranks, so
each forward computes the same bf16 products; what changes is the order of the fp32 gradient sums (accumulated
over 4 micro-batches on one rank, 2 + 2 and reduced in fp32 on two). An fp32-sized difference in a master weight
can flip its bf16 rounding, which moves what the model computes by up to bf16's relative rounding, 2^-9 (about
2e-3): the tolerance. Measured: identical losses at steps 7..12, held-out metrics within 1e-8.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import COMPARED_RUN, assert_export_is_the_model_in_training, evaluations, launch, train_args
from safetensors.torch import load_file

from tnf_scale.metrics import read_metrics

pytestmark = pytest.mark.launcher

BF16_RUN = dict(max_steps=12, save_interval=6, eval_interval=6, precision="bf16", **COMPARED_RUN)
LAYOUT_TOLERANCE = 2e-3  # bf16's relative rounding: see the module docstring
# The export in bf16 against the run's bf16 evaluation: measured 1e-8 (ZeRO-1, pipeline); ZeRO-3 4e-6 and 1.2e-5 in two
# runs, a gap whose cause is not found (an untrained export is 2e-2 off)
EXPORT_TOLERANCE = {"zero3_w2": 1e-4}


@pytest.fixture(scope="module")
def bf16_runs(small_config, tmp_path_factory) -> dict[str, Path]:
    """One bf16 run per path: ZeRO-1 on 2 ranks (DeepSpeed's BF16_Optimizer), ELECTRA with ZeRO-2 on 1 rank, ZeRO-3
    on 2 ranks, 2 pipeline stages x 2 replicas (BF16_Optimizer on stages, each partitioned over its replicas, the tied
    embeddings on both stages: BERT-large's pipeline recipe)."""
    layouts = {
        "zero1_w2": (2, dict(deepspeed_config="ds_configs/zero1.json")),
        "electra_zero2_w1": (1, dict(deepspeed_config="ds_configs/zero2.json", objective="electra")),
        # 17 held-out sequences are 9 and 8, 3 and 2 micro-batches of 4: every replica must still run 3 forwards,
        # each of which gathers ZeRO-3's parameters collectively (planted: with 2 on one replica the run hangs)
        "zero3_w2": (2, dict(deepspeed_config="ds_configs/zero3.json", eval_sequences=17)),
        "pipeline_2x2": (4, dict(deepspeed_config="ds_configs/tiny_pp2.json")),
    }
    runs = {}
    for name, (ranks, flags) in layouts.items():
        out = tmp_path_factory.mktemp(f"bf16_{name}")
        proc = launch(ranks, ["tnf_scale/train.py", *train_args(small_config, out, **BF16_RUN, **flags)])
        (out / "launch.log").write_text(proc.stdout)
        runs[name] = out
    return runs


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def bf16_weights(ckpt: Path, key: str) -> torch.Tensor:
    """The exported parameter `key` as the model held it in bf16: in the first pipeline stage's layer file, or in the
    module file (named under the objective's network prefix)."""
    files = sorted(ckpt.glob("layer_00-model_states.pt"))
    if files:
        return torch.load(files[0], map_location="cpu", weights_only=True)[key.removeprefix("bert.")]
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    return next(value for name, value in module.items() if name.endswith(f".{key}"))


@pytest.mark.parametrize("layout", ["zero1_w2", "electra_zero2_w1", "zero3_w2", "pipeline_2x2"])
def test_bf16_trains_and_exports_the_fp32_master_weights(bf16_runs, layout, prepared, small_config):
    run = bf16_runs[layout]
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 13)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[12] < losses[1]  # it learns
    assert evaluations(run)[12]["eval_loss_no_notes"] < evaluations(run)[0]["eval_loss_no_notes"]
    export = load_file(str(run / "export" / "model.safetensors"))
    key = (
        "electra.embeddings.word_embeddings.weight" if "electra" in layout else "bert.embeddings.word_embeddings.weight"
    )
    weights = export[key]
    assert weights.dtype == torch.float32
    # fp32 masters updated by 12 steps of Adam are almost never exactly representable in bf16; their rounding is
    # what the model computed with
    assert (weights.bfloat16().float() == weights).float().mean() < 0.01, "the export is bf16-rounded"
    if "electra" not in layout:  # and they are the trained model: in bf16 it scores what the run's last evaluation did
        rel = EXPORT_TOLERANCE.get(layout, 1e-5)
        assert_export_is_the_model_in_training(run, prepared, small_config, torch.bfloat16, rel=rel)
    if layout != "zero3_w2":  # ZeRO-3 keeps no whole module in its model file
        held = bf16_weights(run / "checkpoints" / "step00000012", key)
        assert held.dtype == torch.bfloat16 and torch.equal(weights.bfloat16(), held)


def test_the_start_up_line_says_the_precision_and_why(bf16_runs):
    assert "precision bf16 (--precision bf16)" in (bf16_runs["zero1_w2"] / "launch.log").read_text()
    provenance = json.loads((bf16_runs["zero1_w2"] / "provenance.json").read_text())
    assert provenance["precision"] == "bf16"


@pytest.mark.parametrize(
    "layout, config, ranks",
    [("zero1_w2", "ds_configs/zero1.json", 1), ("pipeline_2x2", "ds_configs/tiny_pp2.json", 2)],
)
def test_a_bf16_checkpoint_resumes_on_another_world_size(bf16_runs, layout, config, ranks, small_config, tmp_path):
    """ZeRO-1 from 2 ranks onto 1; the pipeline from 2 stages x 2 replicas onto 2 x 1 (the stages stay, the replicas
    change). Planted: the pipeline refused on another world size, as before, fails it."""
    source = bf16_runs[layout]
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000012")
    flags = dict(deepspeed_config=config, resume="true")
    launch(ranks, ["tnf_scale/train.py", *train_args(small_config, resumed, **BF16_RUN, **flags)])
    expected, got = step_losses(source), step_losses(resumed)
    for step in range(7, 13):  # trained on fewer ranks from the checkpoint (DeepSpeed's universal form)
        assert got[step] == pytest.approx(expected[step], rel=LAYOUT_TOLERANCE), step
    for key, value in evaluations(source)[12].items():
        assert evaluations(resumed)[12][key] == pytest.approx(value, rel=LAYOUT_TOLERANCE), key
    # a note, an average of bf16 contexts, is mixed in as a vector: each row within bf16's rounding of its length
    # (measured: 1.5e-3 at most, 107 of 1,331 rows differing at all; a lost or misplaced row is off by about 1)
    expected, got = (load_file(str(run / "notes.safetensors"))["vectors"] for run in (source, resumed))
    row_diff = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert float(row_diff.max()) <= LAYOUT_TOLERANCE, float(row_diff.max())
    assert (resumed / "checkpoints" / "universal" / "step00000006").is_dir()


def test_a_bf16_checkpoint_resumes_on_the_same_ranks_bit_for_bit(bf16_runs, small_config, tmp_path):
    """The same ranks and precision resume exactly: every loss, held-out metric and note as the uninterrupted run
    (test_train_e2e's resume, from a step after which DeepSpeed's CPU Adam would differ afresh, checks its replay)."""
    source = bf16_runs["zero1_w2"]
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000012")
    flags = dict(deepspeed_config="ds_configs/zero1.json", resume="true")
    launch(2, ["tnf_scale/train.py", *train_args(small_config, resumed, **BF16_RUN, **flags)])
    assert step_losses(resumed) == step_losses(source)
    assert evaluations(resumed)[12] == evaluations(source)[12]
    notes = [load_file(str(run / "notes.safetensors"))["vectors"] for run in (source, resumed)]
    assert torch.equal(*notes)


def test_a_failed_universal_conversion_says_deepspeeds_own_words(bf16_runs, tmp_path):
    """DeepSpeed's conversion runs in the process that needs it, so its failure reaches the log as DeepSpeed's own
    error (before, a subprocess's exit status with its output captured away). Planted: an optimizer-state file
    missing from a copy of the checkpoint."""
    from tnf_scale.checkpoint import ConversionFailed, universal_form

    ckpt = tmp_path / "checkpoints" / "step00000012"
    shutil.copytree(bf16_runs["zero1_w2"] / "checkpoints" / "step00000012", ckpt)
    next(ckpt.glob("bf16_zero_pp_rank_1_*optim_states.pt")).unlink()
    with pytest.raises(ConversionFailed, match=r"DeepSpeed's universal conversion of .*step00000012 failed: \w+"):
        universal_form(ckpt)
    assert not (tmp_path / "checkpoints" / "universal" / "step00000012" / "COMPLETE").exists()
