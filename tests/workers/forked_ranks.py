"""Ranks forked from one server process that has imported the training stack once: each rank then runs its script as
`python -u script args` would (as `__main__`, from the repository root, in its own environment and output files),
without importing torch, transformers, DeepSpeed and datasets again, about 10 s of CPU a rank here. Forked from the
server before it ran anything, never from a process that trained, so no state carries from one launch to the next.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import sys
import traceback
from pathlib import Path

SERVER = multiprocessing.get_context("forkserver")  # started by the first rank, for the rest of the session
SERVER.set_forkserver_preload(["tnf_scale.train"])  # what a rank's script imports first: the training stack


def run_script(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked rank: its environment, working directory, argv and output files, then the script as
    `__main__`, then the interpreter's exit handlers; the process ends with the script's exit status."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(opened, fd)
        os.close(opened)
    for stream in (sys.stdout, sys.stderr):  # as under python -u: each line reaches the file when written
        stream.reconfigure(line_buffering=True, write_through=True)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(cwd, script).parent))  # as `python script` puts the script's folder first
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if isinstance(stop.code, int) or stop.code is None:
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ForkedRank:
    """One rank forked from the server, with the part of subprocess.Popen's interface the launch helper uses."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], cwd: Path, out: Path, err: Path):
        self.process = SERVER.Process(target=run_script, args=(script, args, env, str(cwd), str(out), str(err)))
        self.process.start()

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        self.process.is_alive()  # reaps an ended rank
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self) -> int | None:
        self.process.join()
        return self.process.exitcode
