"""Where a process of the distributed runtime sits: its rank and store (`World`), the backend
it talks with (`choose_backend`), and its place in the (pp, dp) grid of stages x replicas
(`MeshLayout`). No connection is made here; `transport.Comm` makes them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from layerpipe.errors import DistributedError


@dataclass(frozen=True)
class World:
    """Where this process sits: rank, world size and how to reach the store."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    #: the store is hosted outside the ranks (the `--nproc` launcher or torchrun's agent)
    store_hosted: bool = False
    #: torchrun restart attempt; keys are namespaced by it
    restart: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World | None:
        """The world torchrun or the `--nproc` launcher describe; None outside them."""
        env = dict(os.environ) if env is None else env
        if "WORLD_SIZE" not in env:
            return None
        world_size = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", "0"))
        port = env.get("MASTER_PORT")
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=int(env.get("LOCAL_RANK", str(rank))),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world_size))),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(port) if port else None,
            store_hosted=env.get("LAYERPIPE_STORE_HOSTED") == "1" or env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            restart=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )

    @property
    def prefix(self) -> str:
        return f"layerpipe/{self.restart}/"


def choose_backend(device: torch.device, requested: str, world: World) -> tuple[str, bool]:
    """(backend, staging). `auto`: NCCL when every local process owns a GPU, else gloo; gloo
    with CUDA tensors always goes through CPU copies."""
    if requested not in ("auto", "gloo", "nccl"):
        raise DistributedError(f"unknown backend {requested!r}; choose auto, gloo or nccl")
    cuda = device.type == "cuda"
    own_gpu = cuda and torch.cuda.is_available() and torch.cuda.device_count() >= world.local_world_size
    if requested == "nccl":
        if not cuda:
            raise DistributedError("--backend nccl needs --device cuda")
        if not own_gpu:
            raise DistributedError(
                f"--backend nccl needs one GPU per process: {world.local_world_size} processes on this node, "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPUs (use --backend gloo)"
            )
        return "nccl", False
    if requested == "auto" and own_gpu and world.world_size > 1:
        return "nccl", False
    return "gloo", cuda


class MeshLayout:
    """Where each rank sits in the (pp, dp) grid: rank -> (stage, replica), and back.

    Read from the `DeviceMesh` when there is one (`mesh.mesh`, a K x R tensor of ranks), else
    the same layout without one: rank = stage * R + replica. Failure lines describe a rank
    with it ("stage 1 replica 0"; "stage 1" when R = 1, as before data parallelism)."""

    def __init__(self, world_size: int, dp: int = 1, mesh: Any = None) -> None:
        if dp < 1 or world_size % dp:
            raise DistributedError(f"the world size {world_size} is not a multiple of --dp {dp}")
        grid = mesh.mesh.cpu() if mesh is not None else torch.arange(world_size).view(world_size // dp, dp)
        self.grid = grid.view(-1, dp)
        self.num_stages, self.dp = int(self.grid.shape[0]), dp
        self._coords = {int(r): (k, j) for k, row in enumerate(self.grid.tolist()) for j, r in enumerate(row)}

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, replica) of `rank`."""
        return self._coords[rank]

    def rank(self, stage: int, replica: int) -> int:
        return int(self.grid[stage, replica])

    def replicas(self, stage: int) -> list[int]:
        """The ranks of the stage's "dp" group."""
        return [int(r) for r in self.grid[stage].tolist()]

    def describe(self, rank: int | None) -> str:
        if rank is None or rank not in self._coords:
            return f"rank {rank}"
        k, j = self._coords[rank]
        return f"stage {k}" if self.dp == 1 else f"stage {k} replica {j}"
