"""Run metrics: one JSON line per record in metrics.jsonl, the same scalars in TensorBoard."""

from __future__ import annotations

import functools
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from tnf_scale.run_dir import WANDB_ID_FILE, RunDir


class MetricsLogger:
    """Writes on rank 0 only; other ranks hold a logger that does nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool,
        resumed_step: int | None = None,
        wandb_project: str | None = None,
        settings: dict[str, Any] | None = None,
    ):
        """With `resumed_step`, records after that step (from the interrupted run) are dropped first; with
        `wandb_project`, the records go to Weights & Biases too (`settings`: the run's, as its W&B config)."""
        self.enabled = enabled
        self.path = RunDir(output_dir).metrics
        self.tb_dir = RunDir(output_dir).tensorboard
        self._writer = None
        self._wandb = None
        if not enabled:
            return
        if wandb_project:
            self._wandb = wandb_run(RunDir(output_dir), wandb_project, settings or {})
        purge_step = None
        if resumed_step is not None:
            purge_step = resumed_step + 1
            kept = [r for r in read_metrics(output_dir) if r["step"] <= resumed_step] if self.path.is_file() else []
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(self.path)
        self._writer = SummaryWriter(str(self.tb_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` (which must hold `step`) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, record["step"])
        self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run(run: RunDir, project: str, settings: dict[str, Any]):
    """The W&B run of this run directory: its id kept in the directory, so a resume continues the same W&B run."""
    import wandb  # installed: --wandb_project is refused before the run starts otherwise

    id_file = run.path / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project, id=run_id, resume="allow", name=run.path.name, dir=str(run.path), config=settings
    )


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All whole records of a run's metrics.jsonl, in order. A line that is not one (a run killed while writing it)
    is skipped and said once on stderr, so that reports and a resume read what was written whole."""
    path = RunDir(run_dir).metrics
    records, skipped = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
            skipped.append(number)
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        elif record is not None:
            skipped.append(number)
    if skipped:
        say_once(f"warning: skipped {len(skipped)} line(s) of {path} that are not whole records (line {skipped[0]}"
                 f"{' and on' if len(skipped) > 1 else ''}): a run killed while writing, or an edit.")  # fmt: skip
    return records


CUMULATIVE = ("step", "tokens", "wall_time")  # counted from a run's start: a later phase adds the earlier ones'


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's records preceded by those of the phases it continues (--init_from a run, followed back), as one run:
    a later phase's steps, tokens and training time follow on from the earlier phase's last, and its step-0
    evaluation, the earlier phase's final model scored again, is left out. Each record says its `phase` (1, 2, ...)."""
    run = RunDir(run_dir)
    records = read_metrics(run_dir)
    source = run.read_run_config().get("init_from") if run.run_config.is_file() else None
    if not source or not RunDir(source).run_config.is_file():  # a fresh start, or a start from a model: phase 1
        return [{**r, "phase": 1} for r in records]
    earlier = read_history(source)
    offsets = {key: max((r[key] for r in earlier if key in r), default=0) for key in CUMULATIVE}
    phase = earlier[-1]["phase"] + 1 if earlier else 1
    later = [
        {**r, **{key: r[key] + offsets[key] for key in CUMULATIVE if key in r}, "phase": phase}
        for r in records
        if r["step"] > 0
    ]
    return earlier + later


@functools.cache
def say_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
