"""When a rank fails mid-run: each rank that sees a failure records when and what (`<output_dir>/failures/`), and
the lowest surviving rank names the first rank to fail and the resume command with its step.

A rank killed outright (SIGKILL, a crash in native code, a lost node) leaves no record: a rank without one is
named as having died first, unless a rank failed on its own (an error that is not a collective losing its peer):
the others may then still be waiting in a collective that has not noticed, silent but alive, and the first such
rank is named. Times come from each host's clock; across nodes they are as good as their sync.
"""

from __future__ import annotations

import json
import os
import socket
import time

import torch

from tnf_scale.run_dir import RunDir

RECORD_WAIT_SECONDS = 3.0  # how long a survivor waits for the other ranks' records
PEER_LOST_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is this rank's view of another rank's failure: a collective or its store losing a peer."""
    return isinstance(error, torch.distributed.DistError) or any(words in str(error) for words in PEER_LOST_WORDS)


def record_failure(run: RunDir, rank: int, error: BaseException) -> None:
    """Write this rank's failure record (best effort: the disk may be the problem)."""
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    record = {
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        "error": f"{type(error).__name__}: {first_line}",
        "peer_lost": lost_a_peer(error),
    }
    try:
        run.failures.mkdir(parents=True, exist_ok=True)
        (run.failures / f"rank{rank:05d}.json").write_text(json.dumps(record) + "\n")
    except OSError:
        pass


def read_failures(run: RunDir) -> dict[int, dict]:
    records = {}
    for path in sorted(run.failures.glob("rank*.json")) if run.failures.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            records[int(record["rank"])] = record
        except (OSError, ValueError, KeyError):
            continue
    return records


def first_failure(records: dict[int, dict], world_size: int) -> tuple[list[int], str]:
    """(ranks that failed first, one clause saying how)."""
    on_its_own = [r for r in records.values() if not r.get("peer_lost")]
    silent = [r for r in range(world_size) if r not in records]
    if silent and not on_its_own:
        names = ", ".join(map(str, silent))
        return (
            silent,
            f"rank{'s' if len(silent) > 1 else ''} {names} died first without a word (killed, out of memory, "
            f"or lost with its node)",
        )
    first = min(on_its_own or records.values(), key=lambda r: r["time"])
    return [first["rank"]], f"rank {first['rank']} on {first['host']} failed first ({first['error']})"


def last_words(run: RunDir, world_size: int, resume_step: int | None) -> str:
    """The sentence a surviving rank prints: who failed first and how to continue."""
    _, who = first_failure(read_failures(run), world_size)
    if resume_step is None:
        how = "no checkpoint was completed, so rerun the launch command with --overwrite true to start again"
    else:
        how = (
            f"rerun the launch command with --resume true: it continues from step {resume_step}, the last "
            f"complete checkpoint"
        )
    return f"{who}; {how}."


def settle_failure(
    run: RunDir, rank: int, world_size: int, error: BaseException, resume_step
) -> tuple[bool, str | None]:
    """Record this rank's failure and wait for the others' records. Returns (this rank failed first, the last words if
    this rank is the lowest survivor, else None). `resume_step()` gives the step a resume continues from (None:
    none)."""
    record_failure(run, rank, error)
    time.sleep(RECORD_WAIT_SECONDS)
    records = read_failures(run)
    first, _ = first_failure(records, world_size)
    survivors = [r for r in sorted(records) if r not in first]
    words = last_words(run, world_size, resume_step()) if survivors and rank == survivors[0] else None
    return rank in first, words
