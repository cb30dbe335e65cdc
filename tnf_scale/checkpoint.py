"""Checkpoints: the DeepSpeed engine, every rank's note rows with their ids, the data position and RNG.

Layout: `<output_dir>/checkpoints/step00000300/` holds DeepSpeed's files, one
`notes_rank00000.safetensors` per rank and, written last by rank 0 once every rank has
finished, `COMPLETE` (JSON). A checkpoint without `COMPLETE` is never resumed from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tnf_scale.config import ConfigError

COMPLETE = "COMPLETE"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from, named with the file at fault and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def notes_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"notes_rank{rank:05d}.safetensors"


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint directory that holds a COMPLETE marker, or None."""
    root = checkpoint_root(output_dir)
    done = sorted(p for p in root.glob("step*") if (p / COMPLETE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(engine, output_dir: str | Path, step: int, rank: int, world_size: int,
                    note_state: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint of this step on every rank; COMPLETE appears only after all files are written."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer": trainer_state})
    ckpt = root / tag
    tensors = {"torch_rng_state": torch.get_rng_state()}
    if note_state is not None:
        tensors.update(note_state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(notes_file(ckpt, rank)))
    deepspeed.comm.barrier()
    if rank == 0:
        marker = {"step": step, "world_size": world_size, "notes": note_state is not None, **trainer_state}
        (ckpt / f"{COMPLETE}.tmp").write_text(json.dumps(marker, indent=2) + "\n")
        (ckpt / f"{COMPLETE}.tmp").rename(ckpt / COMPLETE)
    deepspeed.comm.barrier()
    return ckpt


def read_rank_files(ckpt: Path, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's file of a checkpoint; a missing or unreadable one is refused by name."""
    states = []
    for rank in range(world_size):
        path = notes_file(ckpt, rank)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {path.name}; resume from an earlier complete checkpoint or start fresh.")
        try:
            states.append(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({err}); resume from an earlier checkpoint or start fresh.") from None
    return states


def merge_note_rows(states: list[dict[str, torch.Tensor]], num_rare: int, ckpt: Path) -> dict[str, torch.Tensor]:
    """All ranks' note rows as one state sorted by id; every id 0..num_rare-1 must appear exactly once."""
    ids = torch.cat([s["ids"] for s in states])
    order = torch.argsort(ids)
    if len(ids) != num_rare or not torch.equal(ids[order], torch.arange(num_rare)):
        raise CheckpointError(
            f"checkpoint {ckpt} holds {len(ids)} note rows but the rare vocabulary has {num_rare} words; "
            "it belongs to other data — resume with the data it was trained on."
        )
    return {
        "ids": ids[order],
        "vectors": torch.cat([s["vectors"] for s in states])[order],
        "noted": torch.cat([s["noted"] for s in states])[order],
    }


def load_checkpoint(engine, ckpt: Path, rank: int, rare_vocab_digest: str) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    """Load the engine state; return the trainer state and every rank's note file of `ckpt`."""
    marker = json.loads((ckpt / COMPLETE).read_text())
    if marker.get("rare_vocab_digest") != rare_vocab_digest:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with a different rare vocabulary than the data prepared now; "
            "resume with the same corpus, tokenizer and rare band."
        )
    rank_files = read_rank_files(ckpt, marker["world_size"])
    if rank < marker["world_size"]:
        torch.set_rng_state(rank_files[rank]["torch_rng_state"])
    load_path, client = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt}; its model or optimizer files are missing.")
    return client["trainer"], rank_files
