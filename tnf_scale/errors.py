"""Refusals and exit codes: how every entry point ends on a problem it can name.

A `Refusal` is one sentence that names the problem and the fix; the command prints it on stderr and exits with the
refusal's status instead of a traceback. `ConfigError` is the refusal of bad input (configuration, data, files);
the other refusals live with the component that raises them (a damaged checkpoint, a locked run directory, a
diverged run). The exit codes every launcher, batch script and report relies on are named here, once.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import TextIO

BAD_INPUT_EXIT = 2  # a refusal: nothing was lost, fix the input and rerun
DIVERGED_EXIT = 3  # the loss or gradient norm stopped being finite; the last good checkpoint is kept
PREEMPTED_EXIT = 85  # checkpointed on SIGUSR1: the batch script requeues the job
STOPPED_EXIT = 86  # checkpointed on SIGTERM/SIGINT or a dead launcher: rerun with --resume true to continue


class Refusal(Exception):
    """A problem phrased as one sentence that names it and the fix; the command exits with `exit_status`."""

    exit_status = BAD_INPUT_EXIT


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose mistyped or missing flag is one line, as every other refusal: argparse's own message,
    where to read the flags, exit status 2 (argparse prints its whole usage block first)."""

    def error(self, message: str):
        self.exit(BAD_INPUT_EXIT, f"error: {message}; see {self.prog} --help.\n")


class ConfigError(Refusal):
    """Bad input: a flag, a configuration file, the corpus, a directory given on the command line."""


class PeerStopped(Refusal):
    """Another rank refused and said why; this rank exits with the same status, silently."""

    def __init__(self, exit_status: int = BAD_INPUT_EXIT):
        super().__init__("")
        self.exit_status = exit_status


def rank_line(text: str, stream: TextIO | None = None) -> None:
    """`text` and its newline in one write (default: stdout): under `python -u`, as the launchers start ranks, print
    writes them apart, and the lines of ranks sharing a pipe then run into each other."""
    stream = stream or sys.stdout
    stream.write(f"{text}\n")
    stream.flush()


def exit_code(action: Callable[[], int]) -> int:
    """Run a command's body: a Refusal becomes one line on stderr and its exit status, not a traceback."""
    try:
        return action()
    except Refusal as err:
        if str(err):
            rank_line(f"error: {err}", sys.stderr)
        return err.exit_status


def command_line(body: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A command line's `main(argv)`: `body`, with a Refusal turned into its sentence and exit status."""

    @functools.wraps(body)
    def main(argv: list[str] | None = None) -> int:
        return exit_code(lambda: body(argv))

    return main
