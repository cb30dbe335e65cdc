"""The number of CPU threads each rank's torch operations use (torch's intra-op pool), set by the project on every
launch path before anything computes.

Left to torch, the count follows what the launcher allows the process to run on: `mpirun` binds each rank to one
core (1 thread), the `deepspeed` launcher binds none (one thread per core of the node, for each of its ranks). A
different count splits a reduction differently, so the same training rounds differently under two launchers, and
ELECTRA's sampled replacements can turn such a rounding difference into another token. The rule below gives every
launcher the same count for the same ranks per node.
"""

from __future__ import annotations

import os

import torch


def threads_for(
    requested: int | None, ranks_on_node: int, omp_num_threads: str | None, node_cores: int, usable_cores: int
) -> tuple[int, str]:
    """(threads, why): --intra_op_threads when given; else OMP_NUM_THREADS when set (the user's or the launcher's
    choice, e.g. torchrun's 1 or `deepspeed --bind_cores_to_rank`); else the node's cores shared among its ranks, no
    more than the cores this rank may run on."""
    if requested is not None:
        return requested, "--intra_op_threads"
    if omp_num_threads and omp_num_threads.strip().isdigit() and int(omp_num_threads) > 0:
        return int(omp_num_threads), "OMP_NUM_THREADS"
    share = max(1, node_cores // max(ranks_on_node, 1))
    why = f"{node_cores} cores / {ranks_on_node} rank{'s' if ranks_on_node != 1 else ''} on the node"
    if usable_cores < share:
        return usable_cores, f"{why}, bound to {usable_cores}"
    return share, why


def set_intra_op_threads(requested: int | None, ranks_on_node: int) -> str:
    """Set this rank's intra-op thread count by `threads_for`; returns how it was chosen, for the start-up line."""
    threads, why = threads_for(
        requested,
        ranks_on_node,
        os.environ.get("OMP_NUM_THREADS"),
        os.cpu_count() or 1,
        len(os.sched_getaffinity(0)),
    )
    torch.set_num_threads(threads)
    return f"{threads} intra-op thread{'s' if threads != 1 else ''} ({why})"
