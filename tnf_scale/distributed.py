"""Rank discovery, the process topology, process-group start-up and the few collectives the trainer itself needs.

Discovery, in one place, for every way users launch:
  env    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (deepspeed launcher, torchrun)
  slurm  SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; master = first host of SLURM_JOB_NODELIST,
         port = 20000 + SLURM_JOB_ID % 10000 unless MASTER_ADDR / MASTER_PORT are set
  mpi    mpi4py's COMM_WORLD (mpirun, srun --mpi=pmix); master = rank 0's host unless set
  single a lone `python -m tnf_scale.train`: rank 0 of 1 on 127.0.0.1
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.errors import ConfigError
from tnf_scale.launch import free_port

CONTROL_TIMEOUT = datetime.timedelta(hours=6)  # preparing Wikipedia + BookCorpus, converting a BERT-large checkpoint
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass(frozen=True)
class ParallelDims:
    """Pipeline stages x data-parallel replicas = world size (validated before any process group: ds_config.py)."""

    pipeline: int
    data: int


@dataclass(frozen=True)
class Topology:
    """Where this rank sits in each process group, named as in Megatron's parallel_state.

    - world: every rank (`rank`, `size`); the small collectives of distributed.py run on it.
    - pipeline group: the stages one micro-batch passes through (`pipeline_parallel_rank` of `dims.pipeline`).
    - data-parallel group: the replicas that split a global batch (`data_parallel_rank` of `dims.data`).
    - control group: every rank again, on gloo with a timeout of hours (`control`): the waits while one rank
      prepares the data, converts a checkpoint or exports run there, never into NCCL's 10-minute watchdog.
    - note group: the ranks that share one note dictionary: the whole world (`note_group_rank` of
      `note_group_size`); every rank holds a share of the rows, also ranks on inner pipeline stages.
    DeepSpeed orders ranks pipeline-major (its PipeDataParallelTopology): rank = stage x dims.data + replica.
    """

    rank: int
    local_rank: int
    size: int
    device: torch.device
    dims: ParallelDims
    control: object = None  # the control group: gloo with a long timeout, for waits on one rank's long work

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pipeline_parallel_rank(self) -> int:
        return self.rank // self.dims.data

    @property
    def is_first_stage(self) -> bool:
        """This rank feeds the model's inputs (every rank without a pipeline)."""
        return self.pipeline_parallel_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """This rank computes the loss and the last encoder layer's output (every rank without a pipeline)."""
        return self.pipeline_parallel_rank == self.dims.pipeline - 1

    @property
    def data_parallel_rank(self) -> int:
        return self.rank % self.dims.data

    @property
    def data_parallel_size(self) -> int:
        return self.dims.data

    @property
    def note_group_rank(self) -> int:
        return self.rank

    @property
    def note_group_size(self) -> int:
        return self.size


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits, and how that was found out."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # env | slurm | mpi | single
    local_size: int = 1  # ranks on this node

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size} local {self.local_rank} node {socket.gethostname()} "
            f"master {self.master_addr}:{self.master_port} (from {self.source})"
        )


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's task count from SLURM's compressed list (SLURM_STEP_TASKS_PER_NODE, e.g. "4(x2),3": 4, 4, 3)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return 1
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else 1


def _slurm_master() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        hosts = [nodelist.split(",")[0]] if nodelist and "[" not in nodelist else []
    if not hosts:
        raise ConfigError(
            f"cannot find the master node in SLURM_JOB_NODELIST={nodelist!r}; set MASTER_ADDR in the batch script."
        )
    return hosts[0]


def discover() -> RankInfo:
    """Rank, world size and master of this process, from the launcher's environment (see the module doc)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "env",
            int(env.get("LOCAL_SIZE") or env.get("LOCAL_WORLD_SIZE") or 1),  # the deepspeed launcher's, torchrun's
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        return RankInfo(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            env.get("MASTER_ADDR") or _slurm_master(),
            int(env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 10000),
            "slurm",
            slurm_tasks_on_node(
                env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"),
                int(env.get("SLURM_NODEID", 0)),
            ),
        )
    if any(v in env for v in MPI_RANK_VARS):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        master = comm.bcast(env.get("MASTER_ADDR") or socket.gethostname(), root=0)
        port = comm.bcast(int(env.get("MASTER_PORT") or 29500), root=0)
        return RankInfo(comm.Get_rank(), local.Get_rank(), comm.Get_size(), master, port, "mpi", local.Get_size())
    return RankInfo(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def check_master_port(info: RankInfo) -> None:
    """Rank 0 will listen on the master port: refuse, in one sentence, a port another process holds."""
    if (
        info.rank != 0 or info.source == "single" or "TORCHELASTIC_RUN_ID" in os.environ
    ):  # torchrun's agent holds it on purpose
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", info.master_port))
        except OSError:
            raise ConfigError(
                f"master port {info.master_port} is already in use on {socket.gethostname()}; "
                "pass another --master_port to the launcher (or MASTER_PORT)."
            ) from None


def check_gloo_address(info: RankInfo, resolve=socket.gethostbyname) -> None:
    """Refuse a rank that gloo would bind to a loopback address in a job across nodes. Without GLOO_SOCKET_IFNAME,
    gloo (the control group of every run) binds to the address this host's name resolves to, and many images map
    it to 127.0.1.1 in /etc/hosts: the other nodes could never connect. A master that is itself a loopback address
    (ranks on one host, as in the suite's two loopback nodes) is fine. `resolve`: name -> IPv4 address."""
    if info.world_size <= info.local_size or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        own, master = resolve(socket.gethostname()), resolve(info.master_addr)
    except OSError:
        return  # the rendezvous will name an unresolvable master itself
    if own.startswith("127.") and not master.startswith("127."):
        raise ConfigError(
            f"this node's name {socket.gethostname()} resolves to the loopback address {own}, to which gloo would "
            f"bind, so the other nodes of this {info.world_size}-rank job could not reach it; set GLOO_SOCKET_IFNAME "
            "to the network interface the nodes share (e.g. GLOO_SOCKET_IFNAME=eth0, as NCCL_SOCKET_IFNAME)."
        )


def shm_buffer(info: RankInfo) -> Path:
    """The /dev/shm file DeepSpeed's CPU shared-memory all-reduce creates for this rank (all ranks on one host)."""
    return (
        Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{info.master_addr}_{info.master_port}_{info.rank}"
    )


def release_shm_buffer(info: RankInfo) -> None:
    """Unlink this rank's shared-memory all-reduce buffer once every rank has mapped them all.

    DeepSpeed never removes these files (64 MB a rank): run after run they fill /dev/shm, that is RAM.
    Unlinked, the mappings stay valid until the processes exit, and nothing is left behind, even after a kill.
    """
    deepspeed.comm.barrier()  # every rank has opened every buffer inside init_distributed
    shm_buffer(info).unlink(missing_ok=True)


def gpus_listed() -> int:
    """NVIDIA GPUs the driver lists on this node (0 without a driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def check_torch_sees_gpus(listed: int, torch_sees: int, visible: str | None, accelerator: str | None = None) -> None:
    """Refuse a node whose driver lists GPUs that torch cannot see (a CPU build of torch in a GPU node's
    environment would otherwise train on the CPU without a word), and a DS_ACCELERATOR=cpu (`accelerator`) where
    torch sees GPUs, which would do the same. `visible`: CUDA_VISIBLE_DEVICES; hiding every GPU with it ("" or -1)
    asks for the CPU on purpose."""
    on_purpose = visible in ("", "-1")
    if listed and not torch_sees and not on_purpose:
        raise ConfigError(
            f"this node has {listed} NVIDIA GPU(s) but torch {torch.__version__} sees none (a CPU build, or a CUDA "
            "build this driver cannot run): install the CUDA build of torch (make install in a fresh .venv on this "
            "node), or set CUDA_VISIBLE_DEVICES= to train on the CPU on purpose."
        )
    if accelerator == "cpu" and torch_sees and not on_purpose:
        raise ConfigError(
            f"DS_ACCELERATOR=cpu on a node where torch sees {torch_sees} GPU(s) would train on the CPU: unset "
            "DS_ACCELERATOR to train on the GPUs, or also set CUDA_VISIBLE_DEVICES= to train on the CPU on purpose."
        )


def check_this_node() -> None:
    """check_torch_sees_gpus for this node, this torch and this environment's DS_ACCELERATOR."""
    torch_sees = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env = os.environ
    check_torch_sees_gpus(gpus_listed(), torch_sees, env.get("CUDA_VISIBLE_DEVICES"), env.get("DS_ACCELERATOR"))


def device_name(device: torch.device) -> str:
    """The device a rank computes on, as the throughput report looks its peak up: a CUDA GPU's exact name (as NVML
    gives it), else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_index(local_rank: int, device_count: int) -> int:
    """This rank's device among those it sees: a node's ranks take them in turn, and a rank bound to its own GPU
    (SLURM's per-task binding, CUDA_VISIBLE_DEVICES of one) sees one device, index 0, whatever its local rank."""
    if device_count < 1:
        raise ConfigError(f"local rank {local_rank} sees no accelerator device; check the job's GPU binding.")
    return local_rank % device_count


def rank_device_index(local_rank: int, accelerator) -> int | None:
    """This rank's device on a DeepSpeed accelerator, by `device_index` over the devices it sees; None on the CPU."""
    if accelerator.device_name() == "cpu":
        return None
    return device_index(local_rank, accelerator.device_count())


def deepspeed_rank_env(local_rank: int, device: int | None, env: dict[str, str]) -> dict[str, str]:
    """The LOCAL_RANK DeepSpeed is given: the index of this rank's device among those it sees (`device`; None on
    the CPU, where it stays the node-local rank).

    DeepSpeed takes LOCAL_RANK as the device index (the process group's device_id, the engine's set_device, a
    pipeline stage's placement, ZeRO-3's gathers), so a rank bound to its own GPU (one visible device, index 0) would
    otherwise ask for device SLURM_LOCALID and fail with an invalid device ordinal. The node-local rank stays in
    `RankInfo.local_rank` / `Topology.local_rank` for what needs it (who prepares the data on a node). Under mpirun
    DeepSpeed's engine asserts that OMPI_COMM_WORLD_LOCAL_RANK equals LOCAL_RANK, so it is given the same index
    (MPI itself read it at start-up)."""
    index = str(local_rank if device is None else device)
    update = {"LOCAL_RANK": index}
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        update["OMPI_COMM_WORLD_LOCAL_RANK"] = index
    return update


def init_distributed(info: RankInfo, dims: ParallelDims | None = None) -> Topology:
    """Start the process group DeepSpeed uses, from the discovered ranks; `dims` default: data parallelism only."""
    accelerator = get_accelerator()
    index = rank_device_index(info.local_rank, accelerator)
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
        **deepspeed_rank_env(info.local_rank, index, dict(os.environ)),
    )
    # NCCL: on a failed or timed-out collective, abort the communicators and raise at the rank's next wait on NCCL
    # (2, CleanUpOnly), instead of the default (3) of ending the process from the watchdog thread: the survivors then
    # say their last words and stop (docs/failures.md: what the launcher ends sooner)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    if index is not None:  # before the process group, which binds NCCL's communicator to the current device
        accelerator.set_device(index)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), auto_mpi_discovery=False)
    control = torch.distributed.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    release_shm_buffer(info)
    device = torch.device(accelerator.device_name(index)) if index is not None else torch.device("cpu")
    size = deepspeed.comm.get_world_size()
    return Topology(deepspeed.comm.get_rank(), info.local_rank, size, device, dims or ParallelDims(1, size), control)


def end_process_groups() -> None:
    """Destroy every process group while the interpreter is still whole.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they use and the process ends in
    `terminate called without an active exception` (SIGABRT, exit 134) after a run that finished: a scheduler then
    marks the job failed. Called on every way out of a command: done, refused, stopped by a signal, failed.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wait_for_all(topo: Topology) -> None:
    """Every rank waits here for the others, on the control group (a wait of hours is fine)."""
    if topo.size > 1:
        torch.distributed.barrier(group=topo.control)


def any_rank_on_control(flag: bool, topo: Topology) -> bool:
    """True on every rank when `flag` is true on at least one, agreed on the control group (hours may pass first)."""
    if topo.size == 1:
        return flag
    t = torch.tensor([float(flag)])
    torch.distributed.all_reduce(t, group=topo.control)
    return bool(t.item() > 0)


def in_own_slot(value: float, rank: int, size: int) -> list[float]:
    """`value` in slot `rank` of `size` zeros: summed over the ranks (in an all_reduce_sum), every rank's value."""
    slots = [0.0] * size
    slots[rank] = value
    return slots


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, one collective on the world; none in a world of one, where
    the step's first collective measured 1.4-1.8 ms on a busy 2-core host, a second one right after it 0.16 ms)."""
    if deepspeed.comm.get_world_size() == 1:
        return [float(value) for value in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    deepspeed.comm.all_reduce(t)
    return t.tolist()
