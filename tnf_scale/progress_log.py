"""What a run shows of its progress: a tqdm bar on a terminal; in a batch job's log (stderr not a terminal), one plain
line per logged step, which a `.out` file keeps readable where a bar's carriage returns would pile up."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm


def plain_line(record: dict, total_steps: int) -> str:
    """One logged step in words: step, loss, learning rate, tokens/s, MFU, gradient norm, notes read, held-out loss."""
    parts = [f"step {record['step']}/{total_steps}"]
    if "loss" in record:  # a training step's figures (an evaluation between logged steps has none)
        parts += [f"loss {record['loss']:.4f}", f"lr {record['lr']:.3g}", f"{record['tokens_per_s']:,.0f} tokens/s"]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.3g}")
    if "occurrences_read" in record:
        parts.append(f"notes read {record['occurrences_read']:,.0f}")
    if "eval_loss_no_notes" in record:
        parts.append(f"held-out loss {record['eval_loss_no_notes']:.4f}")
    return " | ".join(parts)


def on_terminal() -> bool:
    """Whether progress bars (tqdm's and `datasets`', on stderr) reach a terminal rather than a log file."""
    return sys.stderr.isatty()


class ProgressDisplay:
    """Rank 0's view of the step loop (the other ranks show nothing)."""

    def __init__(self, total_steps: int, first_step: int, label: str, shown: bool, log: Callable[[str], None]):
        self.total_steps, self.log = total_steps, log
        self.lines = shown and not on_terminal()
        self.bar = tqdm(total=total_steps, initial=first_step, desc=label, unit="step", disable=not shown or self.lines)

    def step(self, loss: float, tokens_per_s: float, record: dict) -> None:
        """After each step: the bar moves; a logged step's record (empty when not logged) becomes a plain line."""
        if self.lines:
            if record:
                self.log(plain_line(record, self.total_steps))
            return
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
