"""Resuming a run: the checkpoint every process reads, the check that it is this run's,
and the random generators restored from it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import UsageError
from .batches import _rank_seed
from .config import TrainConfig
from .files import RunFiles
from .run import RunMismatchError, identity_differences, train_identity


def _shared_checkpoint(run: RunFiles, rank: int, world_size: int) -> dict | None:
    """The checkpoint rank 0 reads, in every process (a multi-node run need not share a
    file system); an error reading it is raised in every process, so none waits."""
    if world_size == 1:
        run.checkpoints.recover()
        return run.checkpoints.load()
    payload = [None]
    if rank == 0:
        try:
            run.checkpoints.recover()
            payload[0] = ("state", run.checkpoints.load())
        except Exception as exc:  # noqa: BLE001 - handed to every process, raised there
            payload[0] = ("error", exc)
    dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def _check_resumable(
    state: dict, identity: dict, world_size: int, steps_per_epoch: int, root: Path
) -> None:
    """Refuse to resume a checkpoint of another run: one line naming what differs."""
    saved = state.get("identity")
    if saved is None:  # a version-1 checkpoint: only its training configuration is known
        config = TrainConfig.from_dict(state["config"]).to_dict()
        saved = {"train": train_identity(config, state.get("world_size", 1))}
        current = {"train": identity["train"]}
    else:
        current = identity
    differences = identity_differences(saved, current)
    if differences:
        raise RunMismatchError(root, differences)
    saved_world = state.get("world_size", 1)
    saved_steps = state.get("steps_per_epoch", steps_per_epoch)
    if saved_world != world_size and saved_steps != steps_per_epoch:
        batch = identity["train"]["global_batch_size"]
        raise UsageError(
            f"{root} holds a run of {saved_world} process(es) ({saved_steps} steps per "
            f"epoch); {world_size} process(es) give {steps_per_epoch}: resume it with "
            f"{saved_world} process(es), or restart it (global batch {batch})"
        )


def _restore_rng(state: dict, seed: int, rank: int, world_size: int, device: torch.device) -> None:
    rng = state["rng"]
    ranks = rng.get("ranks")
    if world_size > 1 and ranks is not None and len(ranks) == world_size:
        torch.set_rng_state(ranks[rank]["torch"])
        if device.type == "cuda" and ranks[rank].get("cuda") is not None:
            torch.cuda.set_rng_state(ranks[rank]["cuda"], device)
    elif rank == 0:
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            if world_size > 1:
                torch.cuda.set_rng_state(rng["cuda"][device.index or 0], device)
            else:
                torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # a different number of processes: freshly seeded generators, deterministic
        torch.manual_seed(_rank_seed(seed, rank) + state["global_step"])
