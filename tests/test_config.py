"""Settings declared once: config files in sections, --help with defaults and choices, --print_config, each command's
own flags, the resume rule of a new setting, and the table in docs/configuration.md."""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from tnf_scale.config import RESUME_MUST_MATCH, RunConfig, build_parser, parse_args, settings_table
from tnf_scale.errors import ConfigError
from tnf_scale.settings import MUST_MATCH, by_section, names_where, setting
from tnf_scale.startup import print_config

CONFIGS = sorted((REPO / "configs").glob("*.*"))


def world_of(path: Path) -> int:
    """The world size an example config is written for (its `# world: N` line)."""
    return int(re.search(r"^# world: (\d+)$", path.read_text(), re.M)[1])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads_and_prints_the_run_it_would_start(path, monkeypatch, capsys):
    ranks = world_of(path)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = parse_args(["--config", str(path)])
    raw = (tomllib.loads if path.suffix == ".toml" else yaml.safe_load)(path.read_text())
    assert cfg.preset == raw["preset"]
    for section, values in raw.items():  # every value the file gives is the run's
        for name, value in values.items() if isinstance(values, dict) else ():
            assert getattr(cfg, name) == value, (section, name)
    assert print_config(cfg) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["settings"] == by_section(cfg)
    assert printed["launch"]["world"].startswith(f"{ranks} ranks (from env)")
    ds = printed["deepspeed_config"]
    assert (
        ds["train_batch_size"] == cfg.global_batch_size and ds["train_micro_batch_size_per_gpu"] == cfg.micro_batch_size
    )
    replicas = ranks // ds.get("pipeline", {}).get("stages", 1)
    assert cfg.micro_batch_size * replicas * ds["gradient_accumulation_steps"] == cfg.global_batch_size
    assert ds["bf16"]["enabled"] == printed["launch"]["precision"].startswith("bf16")


def test_printed_settings_are_a_config_file_of_the_same_run(tmp_path, capsys):
    cfg = parse_args(["--preset", "bert-large", "--lr", "2e-4", "--tnf", "off"])
    print_config(cfg)
    saved = tmp_path / "run.yaml"
    saved.write_text(yaml.safe_dump(yaml.safe_load(capsys.readouterr().out)["settings"]))
    assert parse_args(["--config", str(saved)]) == cfg


def test_print_config_starts_nothing_and_claims_no_directory(tmp_path, capsys):
    from tnf_scale.train import main

    out = tmp_path / "run"
    assert main(["--print_config", "--output_dir", str(out)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["settings"]["run"]["output_dir"] == str(out) and not out.exists()
    assert "precision" in printed["launch"] and "optimizer" in printed["launch"]


def test_help_groups_the_flags_by_section_with_defaults_and_choices():
    text = build_parser().format_help()
    for section in ("data:", "model:", "optimization:", "notes:", "run:", "logging:"):
        assert f"\n{section}\n" in text, section
    flat = re.sub(r"-\s+", "-", " ".join(text.split()))  # argparse wraps lines after hyphens
    assert "--precision {auto,bf16,fp32}" in flat and "--objective {mlm,electra}" in flat
    assert "tokens per packed sequence, [CLS] and [SEP] included (default: 128)" in flat
    assert "tiny, bench, bert-base, bert-large, electra-tiny, electra-small, electra-base" in flat


def test_tnf_prepare_shows_only_the_data_settings(capsys):
    from tnf_scale.cli.prepare import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--corpus" in text and "--rare_min_count" in text
    for flag in ("--lr", "--resume", "--export", "--hidden_size", "--note_lambda"):
        assert flag not in text, flag


def test_the_preparation_commands_former_module_runs_it():
    """`python -m tnf_scale.prepare`, which earlier scripts used, answered "No module named" once the command moved."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tnf_scale.prepare", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--corpus" in proc.stdout and "--lr" not in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    "text, suffix, message",
    [
        ("[data]\nhidden_size = 64\n", ".toml", r"puts hidden_size under \[data\]; it belongs under \[model\]"),
        ("[model\n", ".toml", "is not valid TOML"),
        ("model: [1, 2\n", ".yaml", "is not valid YAML"),
        ("- 1\n- 2\n", ".yaml", "must hold a table of settings"),
        ("[notes]\ntnf = 'maybe'\n", ".toml", "gives tnf = 'maybe', but tnf takes 'on' or 'off'"),
    ],
)
def test_a_bad_config_file_is_one_sentence(text, suffix, message, tmp_path):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["--config", str(path)])


def test_a_new_setting_must_match_on_resume_unless_it_says_otherwise():
    """Adding a setting is one field: its resume rule defaults to "must match", so a new field that shapes the model
    is checked on resume without anyone remembering a list (planted: a MAY_CHANGE default fails this)."""

    @dataclasses.dataclass
    class WithANewSetting(RunConfig):
        rotary_base: int = setting(10_000, help="the base of rotary position embeddings")

    assert "rotary_base" in names_where(WithANewSetting, "resume", MUST_MATCH)
    assert set(RESUME_MUST_MATCH) == {
        "vocab_size", "max_seq_len", "objective", "hidden_size", "num_layers", "num_heads", "intermediate_size",
        "generator_fraction", "global_batch_size", "seed", "tnf", "max_position_embeddings", "init_from",
    }  # fmt: skip


def test_the_configuration_page_holds_the_table_of_every_setting():
    page = (REPO / "docs" / "configuration.md").read_text()
    begin, end = "<!-- settings table: begin -->\n", "<!-- settings table: end -->"
    table = page[page.index(begin) + len(begin) : page.index(end)]
    assert table == settings_table(), (
        "docs/configuration.md's table is out of date: python -c 'from tnf_scale.config import settings_table; "
        "print(settings_table())' prints it"
    )


def entry_points() -> set[str]:
    """Modules with a command line: pyproject's scripts and train.py."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {target.split(":")[0] for target in scripts.values()} | {"tnf_scale.train"}


def test_no_module_imports_an_entry_point():
    entries = entry_points()
    offenders = []
    for path in (REPO / "tnf_scale").rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            offenders += [f"{module} imports {name}" for name in names if name in entries and name != module]
    assert not offenders, offenders


@pytest.mark.parametrize(
    "tool",
    ["bench_tnf", "fault_campaign", "note_bench", "throughput_report", "time_to_loss", "tnf_sweep", "data_bench"],
)
def test_a_tool_that_forwards_settings_shows_them_after_its_own(tool, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"tnf_scale.cli.{tool}").main(["--help"])
    text = capsys.readouterr().out
    own, forwarded = text.split("Any other flag is a tnf-train setting, passed on to")
    assert stop.value.code == 0 and "--rare_coverage" in forwarded and "--rare_coverage" not in own
    assert ("--note_lambda" in forwarded) == (tool != "data_bench")  # data-bench forwards the data section only
