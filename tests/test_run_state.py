"""Run state owned once: the components' state_dict / load_state_dict and the checkpoint marker's one reader."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tnf_scale.checkpoint import COMPLETE, CheckpointMarker, union_of_ranks
from tnf_scale.config import RunConfig, resume_conflict
from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.notes.store import NoteStore
from tnf_scale.run_state import RngStreams, TrainingProgress


def test_progress_advances_and_round_trips():
    progress = TrainingProgress()
    progress.advance(tokens=100, wall_time=1.5)
    progress.advance(tokens=50, wall_time=2.5)
    assert progress.state_dict() == {"step": 2, "tokens": 150, "wall_time": 2.5}
    again = TrainingProgress()
    again.load_state_dict({**progress.state_dict(), "world_size": 4})  # the marker's other keys are not its own
    assert again == progress


def test_rng_streams_restore_this_ranks_stream_and_keep_their_own_without_one():
    saved = RngStreams().state_dict()
    expected = torch.rand(3)
    RngStreams().load_state_dict(saved)
    assert torch.equal(torch.rand(3), expected)
    before = torch.get_rng_state()
    RngStreams().load_state_dict({})  # a rank the checkpoint did not have
    assert torch.equal(torch.get_rng_state(), before)


def test_the_marker_reads_back_and_reads_markers_of_older_runs(tmp_path):
    marker = CheckpointMarker(step=6, world_size=2, notes=True, tokens=99, wall_time=1.0, rare_vocab_digest="d",
                              pipeline_stages=2, zero_stage=1)  # fmt: skip
    marker.write(tmp_path)
    assert CheckpointMarker.read(tmp_path) == marker and not (tmp_path / f"{COMPLETE}.tmp").exists()
    old = {"step": 3, "world_size": 1, "notes": False, "tokens": 5, "wall_time": 0.5, "rare_vocab_digest": "d"}
    (tmp_path / COMPLETE).write_text(json.dumps(old))  # before pipeline stages and ZeRO stages were recorded
    read = CheckpointMarker.read(tmp_path)
    assert (read.step, read.pipeline_stages, read.zero_stage) == (3, 1, None)


@pytest.mark.parametrize("saved_on, loaded_on", [(2, 1), (2, 4), (4, 3)])
def test_the_store_takes_its_own_rows_out_of_any_partition(saved_on, loaded_on):
    num_rare, dim = 50, 4

    def store(rank: int, size: int) -> NoteStore:
        return NoteStore(num_rare, dim, seed=7, init_std=0.02, gamma=0.1, exchange=ExchangeGroup(rank, size))

    shards = [store(rank, saved_on) for rank in range(saved_on)]
    for shard in shards:
        shard.table += torch.arange(len(shard.ids), dtype=torch.float32)[:, None] + shard.ids[:, None]  # trained rows
        shard.noted[::2] = True
    saved = union_of_ranks([shard.state_dict() for shard in shards])
    whole = {int(i): (v, n) for i, v, n in zip(saved["ids"], saved["vectors"], saved["noted"])}
    for rank in range(loaded_on):
        loaded = store(rank, loaded_on)
        loaded.load_state_dict(saved)
        for i, row, noted in zip(loaded.ids.tolist(), loaded.table, loaded.noted):
            assert torch.equal(row, whole[i][0]) and bool(noted) == bool(whole[i][1])


def test_a_resume_must_keep_the_configs_shape_fields():
    saved = {"hidden_size": 128, "max_steps": 300, "seed": 1234}
    assert resume_conflict(saved, RunConfig(hidden_size=128, max_steps=900)) is None  # more steps: a longer run
    assert resume_conflict(saved, RunConfig(hidden_size=256)) == "hidden_size"
    assert resume_conflict(saved, RunConfig(seed=1)) == "seed"


class FakeAccelerator:
    """An accelerator's RNG interface, as DeepSpeed's accelerators expose it."""

    def __init__(self):
        self.state = torch.tensor([1, 2, 3], dtype=torch.uint8)

    def get_rng_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.state = state.clone()


def test_rng_streams_keep_the_accelerators_generator_too():
    accelerator = FakeAccelerator()
    saved = RngStreams(accelerator).state_dict()
    assert torch.equal(saved[RngStreams.ACCELERATOR_KEY], torch.tensor([1, 2, 3], dtype=torch.uint8))
    accelerator.state = torch.tensor([9], dtype=torch.uint8)  # training drew from it
    RngStreams(accelerator).load_state_dict(saved)
    assert torch.equal(accelerator.state, torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert RngStreams.ACCELERATOR_KEY not in RngStreams().state_dict()  # a CPU rank has no device generator


def test_the_store_lives_on_the_accelerators_device_by_default(monkeypatch):
    """An accelerator whose device is torch's shape-only `meta` device: every tensor of the store goes there (a store
    that kept its rows on the CPU would make a GPU step copy them across every step)."""
    from types import SimpleNamespace

    from tnf_scale.notes import store as store_module

    monkeypatch.setattr(store_module, "get_accelerator", lambda: SimpleNamespace(current_device_name=lambda: "meta"))
    store = NoteStore(10, 4, seed=1, init_std=0.02, gamma=0.1)
    assert store.device == store.slot_of.device == store.noted.device == torch.device("meta")


@pytest.mark.parametrize("local_rank, devices, index", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (9, 4, 1)])
def test_a_rank_takes_its_device_among_those_it_sees(local_rank, devices, index):
    from tnf_scale.distributed import device_index

    assert device_index(local_rank, devices) == index  # one visible GPU per task (SLURM binding): always 0


BASE_SLURM = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "77", "MASTER_ADDR": "node1"}


@pytest.mark.parametrize(
    "binding, env, device",
    [
        ("srun, every GPU shown to every task", {**BASE_SLURM, "SLURM_LOCALID": "5",
                                                 "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, 5),
        ("srun --gpus-per-task=1", {**BASE_SLURM, "SLURM_LOCALID": "5", "CUDA_VISIBLE_DEVICES": "5"}, 0),
        ("srun --gpu-bind=map_gpu:7,6,5,4,3,2,1,0", {**BASE_SLURM, "SLURM_LOCALID": "2",
                                                     "CUDA_VISIBLE_DEVICES": "5"}, 0),
        ("srun --gpus-per-task=2", {**BASE_SLURM, "SLURM_LOCALID": "3", "CUDA_VISIBLE_DEVICES": "6,7"}, 1),
        ("mpirun, a wrapper binding one GPU per rank", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                                        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
                                                        "CUDA_VISIBLE_DEVICES": "3"}, 0),
        ("deepspeed launcher", {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                                "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, 3),
    ],
)  # fmt: skip
def test_deepspeed_is_given_the_index_of_the_device_a_bound_rank_sees(binding, env, device, monkeypatch):
    """Each launcher's binding simulated on the CPU: the rank is discovered from its environment, and DeepSpeed's own
    engine code (which takes LOCAL_RANK as the device index) then names the device the rank sees, while the
    node-local rank stays what the launcher said. Planted: LOCAL_RANK left at the node-local rank fails every bound
    case (5 or 2 or 3 of 1 or 2 visible devices: an invalid device ordinal on a GPU)."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    from tnf_scale.distributed import deepspeed_rank_env, discover, rank_device_index

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = discover()
    visible = len(env["CUDA_VISIBLE_DEVICES"].split(","))
    gpu = SimpleNamespace(device_name=lambda index=None: "cuda", device_count=lambda: visible)
    for name, value in deepspeed_rank_env(info.local_rank, rank_device_index(info.local_rank, gpu), env).items():
        monkeypatch.setenv(name, value)
    engine = SimpleNamespace()
    DeepSpeedEngine._configure_with_arguments(engine, SimpleNamespace(local_rank=None), None)
    assert engine.local_rank == device == int(os.environ["LOCAL_RANK"]), binding
    assert info.local_rank == int(env.get("SLURM_LOCALID") or env["LOCAL_RANK"])
    cpu = SimpleNamespace(device_name=lambda index=None: "cpu", device_count=lambda: 0)
    assert deepspeed_rank_env(info.local_rank, rank_device_index(info.local_rank, cpu), env)["LOCAL_RANK"] == str(
        info.local_rank
    )


def test_a_gpu_node_whose_torch_sees_no_gpu_is_refused():
    from tnf_scale.distributed import check_torch_sees_gpus
    from tnf_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="this node has 8 NVIDIA GPU.* but torch .* sees none.*make install"):
        check_torch_sees_gpus(listed=8, torch_sees=0, visible=None)
    check_torch_sees_gpus(listed=8, torch_sees=8, visible=None)
    check_torch_sees_gpus(listed=0, torch_sees=0, visible=None)  # a CPU node
    check_torch_sees_gpus(listed=8, torch_sees=0, visible="")  # GPUs hidden on purpose: the CPU it is


def test_deepspeeds_cpu_accelerator_where_torch_sees_gpus_is_refused():
    """DS_ACCELERATOR=cpu with a CUDA torch that sees GPUs would train on the CPU without a word (planted: without
    the check this passes silently)."""
    from tnf_scale.distributed import check_torch_sees_gpus
    from tnf_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu on a node where torch sees 4 GPU.*unset DS_ACCELERATOR"):
        check_torch_sees_gpus(listed=4, torch_sees=4, visible=None, accelerator="cpu")
    check_torch_sees_gpus(listed=4, torch_sees=4, visible="", accelerator="cpu")  # the CPU on purpose
    check_torch_sees_gpus(listed=4, torch_sees=4, visible=None, accelerator="cuda")
    check_torch_sees_gpus(listed=0, torch_sees=0, visible=None, accelerator="cpu")  # this machine


def test_finetuning_refuses_a_gpu_node_whose_torch_sees_no_gpu(monkeypatch, tmp_path, capsys):
    """tnf-finetune checks the node as every other entry point does, before anything is loaded or written (planted:
    without the check it goes on to fine-tune on the CPU)."""
    from tnf_scale import distributed
    from tnf_scale.cli import finetune

    monkeypatch.setattr(distributed, "gpus_listed", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    out = tmp_path / "ft"
    assert finetune.main(["--model", str(tmp_path), "--task", "rotten_tomatoes", "--out", str(out)]) == 2
    assert "this node has 8 NVIDIA GPU(s) but torch" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "requested, ranks_on_node, omp, node_cores, usable, expected",
    [
        (None, 2, None, 2, 1, (1, "2 cores / 2 ranks on the node")),  # mpirun -np 2: each rank bound to one core
        (None, 2, None, 2, 2, (1, "2 cores / 2 ranks on the node")),  # the deepspeed launcher: no binding, same count
        (None, 1, None, 2, 2, (2, "2 cores / 1 rank on the node")),
        (None, 8, None, 64, 4, (4, "64 cores / 8 ranks on the node, bound to 4")),  # srun --cpus-per-task=4
        (None, 8, "6", 64, 64, (6, "OMP_NUM_THREADS")),  # the user's (or torchrun's) choice
        (None, 2, "junk", 2, 2, (1, "2 cores / 2 ranks on the node")),
        (3, 2, "6", 2, 2, (3, "--intra_op_threads")),
        (None, 3, None, 2, 2, (1, "2 cores / 3 ranks on the node")),  # more ranks than cores: still one thread
    ],
)
def test_every_launcher_gives_a_rank_the_same_intra_op_threads(requested, ranks_on_node, omp, node_cores, usable,
                                                               expected):  # fmt: skip
    from tnf_scale.threads import threads_for

    assert threads_for(requested, ranks_on_node, omp, node_cores, usable) == expected


@pytest.mark.parametrize("listed, node, tasks", [("2", 0, 2), ("4(x2),3", 1, 4), ("4(x2),3", 2, 3), ("2(x3)", 5, 1)])
def test_slurms_tasks_per_node_list_gives_this_nodes_ranks(listed, node, tasks):
    from tnf_scale.distributed import slurm_tasks_on_node

    assert slurm_tasks_on_node(listed, node) == tasks


def test_overwriting_an_old_run_waits_on_the_control_group(tmp_path, monkeypatch):
    """Rank 0 deletes the old run between two waits of every rank: on the long-timeout gloo group, since deleting a
    large run on a network file system can outlast NCCL's 10-minute watchdog (planted: the world's barriers fail)."""
    import torch

    from tnf_scale.config import RunConfig
    from tnf_scale.distributed import ParallelDims, Topology
    from tnf_scale.run_dir import RunDir

    waits = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda group=None: waits.append(group))
    control = object()
    topo = Topology(0, 0, 2, torch.device("cpu"), ParallelDims(1, 2), control)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "run_config.json").write_text("{}\n")
    RunDir(tmp_path).claim(RunConfig(output_dir=str(tmp_path), overwrite=True), topo)
    assert waits == [control, control] and not (tmp_path / "metrics.jsonl").exists()


def test_a_node_whose_name_resolves_to_loopback_is_refused_in_a_job_across_nodes(monkeypatch):
    """gloo binds to the address the host's name resolves to: 127.0.1.1 on many images, which no other node reaches
    (planted: without the check the case passes silently, and the run would hang at its first gloo group)."""
    from tnf_scale.distributed import RankInfo, check_gloo_address
    from tnf_scale.errors import ConfigError

    addresses = {"node-b": "10.0.0.2", "node-a": "10.0.0.1", "127.0.0.2": "127.0.0.2"}
    monkeypatch.setattr("socket.gethostname", lambda: "node-b")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    across = RankInfo(8, 0, 16, "node-a", 29500, "slurm", local_size=8)
    check_gloo_address(across, addresses.__getitem__)
    loopback = {**addresses, "node-b": "127.0.1.1"}
    with pytest.raises(ConfigError, match="node-b resolves to the loopback address 127.0.1.1.*set GLOO_SOCKET_IFNAME"):
        check_gloo_address(across, loopback.__getitem__)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    check_gloo_address(across, loopback.__getitem__)  # told which interface
    monkeypatch.delenv("GLOO_SOCKET_IFNAME")
    check_gloo_address(RankInfo(0, 0, 8, "node-a", 29500, "slurm", local_size=8), loopback.__getitem__)  # one node
    check_gloo_address(RankInfo(1, 0, 2, "127.0.0.2", 29500, "env"), loopback.__getitem__)  # loopback nodes
