"""Shared fixtures: a small slice of the bundled (real) corpus, prepared once per session."""

from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest
import torch

from tnf_scale.config import BUNDLED_CORPUS, RunConfig
from tnf_scale.launch import deepspeed_command, deepspeed_launcher, free_port

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


# WordPiece of 2,000 tokens trained once on the small corpus (tnf_scale.data.tokenizer.train_wordpiece, as
# preparation trains it). Shared rather than trained in each session: the tokenizers library's trainer numbers
# continuation pieces in a hash table's order, seeded anew in every process, and breaks ties between merges by
# those numbers, so each session trained a slightly different tokenizer (142 of 2,000 ids differed between two)
# and every figure the suite's runs produce moved with it. tests/test_data.py trains tokenizers of its own.
TEST_TOKENIZER = REPO / "tests" / "data" / "tokenizer"


def tokenizer_with_other_ids(folder: Path) -> Path:
    """A copy of TEST_TOKENIZER in `folder` in which two tokens swap ids: the same words, read as other ids."""
    from tnf_scale.reports.input_campaign import with_two_ids_swapped

    return with_two_ids_swapped(TEST_TOKENIZER, folder)


@pytest.fixture(scope="session")
def small_config(small_corpus, tmp_path_factory) -> RunConfig:
    """The tiny preset on the small corpus, with the shared test tokenizer (TEST_TOKENIZER)."""
    return RunConfig(
        corpus=[str(small_corpus)],
        data_cache=str(tmp_path_factory.mktemp("data_cache")),
        tokenizer=str(TEST_TOKENIZER),
        vocab_size=2000,
        max_seq_len=64,
        rare_coverage=0.05,
        eval_fraction=0.05,
    )


@pytest.fixture(scope="session")
def prepared(small_config):
    from tnf_scale.data.prepared import prepare_data

    return prepare_data(small_config, log=lambda *_: None, show_progress=False)


def save_random_bert(tokenizer, folder: Path, **shape) -> Path:
    """A freshly initialised stock BertForMaskedLM of `shape` (BertConfig fields) with `tokenizer`, as save_pretrained
    writes a published model."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **shape)
    BertForMaskedLM(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def clean_env() -> dict[str, str]:
    """This process's environment without the rank variables a process group leaves behind."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO)
    return env


def run_cmd(args: list[str], timeout: int = 600):
    """Run a command from the repository root; return the CompletedProcess (output captured)."""
    import subprocess

    return subprocess.run(args, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)


EVAL_SEQUENCES = 30  # split unevenly over 2 data-parallel ranks and into micro-batches of 4 and 8: padding is exercised


def train_args(cfg: RunConfig, output_dir: Path, **flags) -> list[str]:
    """Flags of tnf_scale/train.py for the small test config, plus `flags`."""
    values = {
        "corpus": cfg.corpus[0],
        "data_cache": cfg.data_cache,
        **({"tokenizer": cfg.tokenizer} if cfg.tokenizer and "init_from" not in flags else {}),  # it gives its own
        "vocab_size": cfg.vocab_size,
        "max_seq_len": cfg.max_seq_len,
        "rare_coverage": cfg.rare_coverage,
        "eval_fraction": cfg.eval_fraction,
        "output_dir": str(output_dir),
        "global_batch_size": 16,
        "micro_batch_size": 8,
        "eval_interval": 20,
        "eval_sequences": EVAL_SEQUENCES,
        "precision": "fp32",  # the invariance tests compare in fp32; the bf16 tests ask for bf16
        **flags,
    }
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


DEEPSPEED = deepspeed_launcher()


def check_ok(proc) -> None:
    """Fail with the command's output when it did not exit 0."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def launch(ranks: int, script_args: list[str], timeout: int = 900, through_deepspeed: bool = False):
    """`ranks` processes of `script_args` on this host from the repository root; fails the test with their output on
    error. With `through_deepspeed`, the real `deepspeed --num_gpus ranks` launcher starts them; otherwise they are
    started as it starts them (its environment and --local_rank), without its two Python processes, each of which
    imports DeepSpeed (about 5 s a launch here), each forked from a process that imported the training stack once
    (about 10 s a rank: start_ranks). The launchers' own tests, and every test of a command line, start fresh ones."""
    port = free_port()
    if through_deepspeed:
        proc = run_cmd(deepspeed_command(ranks, port, *script_args[:1], script_args[1:]), timeout=timeout)
    else:
        proc = start_ranks(ranks, port, script_args, timeout)
    check_ok(proc)
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"the run left DeepSpeed's shared-memory buffers behind: {[p.name for p in left]}"
    return proc


def start_ranks(ranks: int, port: int, script_args: list[str], timeout: int):
    """The ranks as DeepSpeed's launcher starts them on one node: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE,
    CROSS_RANK/CROSS_SIZE, MASTER_ADDR/PORT and --local_rank, their output in one stream; the others are ended when
    one fails, as the launcher does. Each rank is forked from a server that imported the training stack once
    (workers/forked_ranks.py). Returns what run_cmd returns (the first failing rank's exit status)."""
    import subprocess
    import tempfile
    import time

    from workers.forked_ranks import ForkedRank

    script, *args = script_args
    world = {"WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks), "CROSS_RANK": "0", "CROSS_SIZE": "1"}
    world |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder, "stdout"), Path(folder, "stderr")
        out.touch()
        err.touch()
        procs = [
            ForkedRank(
                script,
                [f"--local_rank={rank}", *args],
                {**clean_env(), **world, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                REPO,
                out,
                err,
            )
            for rank in range(ranks)
        ]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode for p in procs):  # one failed: the launcher ends the others
                break
            time.sleep(0.05)
        failed = next((p.returncode for p in procs if p.returncode), 0)  # before the others are killed
        timed_out = not failed and any(p.poll() is None for p in procs)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        if timed_out:
            raise subprocess.TimeoutExpired(script_args, timeout)
        stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
    return subprocess.CompletedProcess(script_args, failed, stdout, stderr)


def evaluations(run: Path) -> dict[int, dict[str, float]]:
    """Every evaluation of a run: step -> its eval_* values."""
    from tnf_scale.metrics import read_metrics

    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("eval_")}
        for r in read_metrics(run)
        if "eval_loss_no_notes" in r
    }


def assert_same_evaluations(run: Path, reference: Path, steps: list[int]) -> None:
    """The held-out metrics of `run` equal the reference's at `steps` (rel 1e-5): the same sequences were scored."""
    got, expected = evaluations(run), evaluations(reference)
    for step in steps:
        assert got[step].keys() == expected[step].keys(), step
        for key, value in expected[step].items():
            assert got[step][key] == pytest.approx(value, rel=1e-5), (step, key)


@torch.no_grad()
def assert_export_is_the_model_in_training(
    run: Path, prepared, cfg: RunConfig, dtype: torch.dtype = torch.float32, rel: float = 1e-5
) -> None:
    """The exported Hugging Face BertForMaskedLM loads with no key missing or unexpected, has the run's vocabulary,
    and, computing in `dtype` (the run's precision), scores the held-out batch as the run's last evaluation did
    (`eval_loss_no_notes`, within `rel`)."""
    from transformers import AutoTokenizer, BertForMaskedLM

    from tnf_scale.data.collate import EVAL_EPOCH, Collator
    from tnf_scale.metrics import read_metrics
    from tnf_scale.model.objective import MaskedLMObjective

    model, loading = BertForMaskedLM.from_pretrained(str(run / "export"), output_loading_info=True)
    assert not any(loading.values()), loading
    assert AutoTokenizer.from_pretrained(str(run / "export")).get_vocab() == prepared.tokenizer.get_vocab()
    size = json.loads((run / "run_config.json").read_text())["eval_sequences"]
    batch = Collator(prepared.tokenizer, cfg.max_seq_len, 0.15, seed=1234)(
        prepared.eval, list(range(size)), list(range(size)), [EVAL_EPOCH] * size
    )
    objective = MaskedLMObjective(model.to(dtype).eval())
    (ce,) = objective(**objective.inputs(batch))
    expected = [r for r in read_metrics(run) if "eval_loss_no_notes" in r][-1]["eval_loss_no_notes"]
    got = float(ce.double().sum()) / int((batch.labels != -100).sum())
    assert got == pytest.approx(expected, rel=rel)


# Runs compared across parallel layouts: dropout 0, global batch 16, micro-batch 4, warmup longer than the run.
COMPARED_RUN = dict(micro_batch_size=4, dropout=0.0, warmup_steps=30)


# ELECTRA runs compared across launchers and world sizes: 12 steps, evaluated and checkpointed every 6, one intra-op
# thread per rank whatever the launcher and the ranks per node (the pdsh test's two loopback "nodes" would otherwise
# take 2 each): a different count rounds differently, and a sampled replacement can turn that into another token.
ELECTRA_RUN = dict(
    objective="electra", max_steps=12, eval_interval=6, save_interval=6, intra_op_threads=1, **COMPARED_RUN
)
# The reference's ZeRO stage: the launcher tests train exactly the reference's configuration, since ELECTRA's sampled
# replacements turn a rounding difference between ZeRO stages into another token now and then.
ELECTRA_ZERO = "ds_configs/zero3.json"


@pytest.fixture(scope="session")
def electra_run(small_config, tmp_path_factory) -> Path:
    """ELECTRA with notes on 2 ranks under the deepspeed launcher, ZeRO-3 (the shared embedding tables partitioned):
    the reference of the ELECTRA tests and of the other launchers."""
    out = tmp_path_factory.mktemp("electra_w2")
    launch(
        2,
        ["tnf_scale/train.py", *train_args(small_config, out, deepspeed_config=ELECTRA_ZERO, **ELECTRA_RUN)],
        through_deepspeed=True,
    )
    return out


@pytest.fixture(scope="session")
def dp_reference_run(small_config, tmp_path_factory) -> Path:
    """TNF on one rank, ZeRO-1, 20 steps with a checkpoint at 10: the reference other layouts must match."""
    out = tmp_path_factory.mktemp("w1")
    launch(
        1,
        [
            "tnf_scale/train.py",
            *train_args(
                small_config,
                out,
                max_steps=20,
                save_interval=10,
                deepspeed_config="ds_configs/zero1.json",
                **COMPARED_RUN,
            ),
        ],
    )
    return out
