"""Any world size: the global batch is the recipe and the micro-batch a memory bound, for every preset, every shipped
DeepSpeed config and world sizes 1..64 (logic, no launch), and the pre-flight check that says so before a job has its
nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from tnf_scale.cli.preflight import main as preflight_main
from tnf_scale.config import PRESETS, resolve
from tnf_scale.ds_config import build_ds_config, fit_micro_batch
from tnf_scale.errors import ConfigError

DS_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "ds_configs").glob("*.json"))
NATIVE = (True, "test")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_layout_is_a_run_or_one_sentence(preset, monkeypatch):
    monkeypatch.chdir(REPO)
    built = 0
    for ds_file in DS_CONFIGS:
        cfg = resolve(preset, {"deepspeed_config": ds_file})
        for world in range(1, 65):
            try:
                ds, dims, _ = build_ds_config(cfg, world, NATIVE)
            except ConfigError as err:
                text = str(err)
                assert "\n" not in text and text.endswith(".") and len(text) < 400, (ds_file, world, text)
                continue
            micro = ds["train_micro_batch_size_per_gpu"]
            assert dims.pipeline * dims.data == world
            assert (
                micro * dims.data * ds["gradient_accumulation_steps"] == cfg.global_batch_size == ds["train_batch_size"]
            )
            assert micro <= cfg.max_micro_batch_size  # the preset's micro-batch is a bound, never exceeded
            larger = [
                m
                for m in range(micro + 1, cfg.max_micro_batch_size + 1)
                if cfg.global_batch_size % (m * dims.data) == 0
            ]
            assert not larger, (ds_file, world, micro, larger)  # and the largest that fits is taken
            built += 1
    assert built  # every preset runs somewhere


def test_the_default_sbatch_layout_builds_with_the_micro_batch_it_says(monkeypatch):
    """slurm/pretrain_large.sh's defaults: 4 nodes x 8 GPUs, bert-large, zero1.json (refused before: 16 x 32 > 256)."""
    monkeypatch.chdir(REPO)
    cfg = resolve("bert-large", {"deepspeed_config": "ds_configs/zero1.json"})
    ds, dims, _ = build_ds_config(cfg, 32, NATIVE, " in the SLURM allocation")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], dims.data) == (8, 1, 32)
    micro, note = fit_micro_batch(cfg, 32)
    assert micro == 8 and note == "micro-batch 8: 16 x 32 replicas does not divide the global batch 256"
    assert fit_micro_batch(cfg, 16) == (16, "")  # where the preset's fits, it is taken and nothing is said


def test_a_micro_batch_the_user_set_is_exact_or_refused_with_the_sizes_that_work():
    cfg = resolve("bert-large", {"micro_batch_size": 16})
    with pytest.raises(ConfigError, match="micro-batches that fit: 8, 4, 2, 1 \\(or leave --micro_batch_size unset"):
        fit_micro_batch(cfg, 32)
    assert fit_micro_batch(resolve("bert-large", {"micro_batch_size": 4}), 32) == (4, "")
    with pytest.raises(ConfigError, match="cannot be shared by 24 data-parallel ranks.*or 16 or 32 data-parallel"):
        fit_micro_batch(resolve("bert-large", {}), 24)


def hostfile(tmp_path: Path, nodes: int, slots: int) -> str:
    path = tmp_path / "hosts"
    path.write_text("".join(f"127.0.0.{2 + n} slots={slots}\n" for n in range(nodes)))
    return str(path)


def test_preflight_reports_the_run_a_hostfile_would_start_or_why_not(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    hosts = hostfile(tmp_path, 4, 8)
    assert (
        preflight_main(["--hostfile", hosts, "--preset", "bert-large", "--deepspeed_config", "ds_configs/zero1.json"])
        == 0
    )
    out = capsys.readouterr().out
    assert "4 nodes, 32 slots, all resolve; the run: 1 pipeline stages x 32 data-parallel, micro-batch 8 x 1" in out
    assert "(micro-batch 8: 16 x 32 replicas does not divide the global batch 256)" in out
    assert preflight_main(["--hostfile", hosts, "--preset", "bert-large", "--micro_batch_size", "16"]) == 2
    assert "micro-batches that fit: 8, 4, 2, 1" in capsys.readouterr().err
    assert preflight_main(["--hostfile", hostfile(tmp_path, 3, 8), "--preset", "bert-large"]) == 2
    assert "cannot be shared by 24 data-parallel ranks in hostfile" in capsys.readouterr().err
