"""Processes under ``torchrun``: which rank this one is, its device, its share of the cores, and
the one object rank 0 must send the others (the tokenizer it trained)."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from v2t_engine.concurrency import available_cores
from v2t_engine.tokenizer import CaptionTokenizer


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1  # ranks on this machine
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cores_per_rank(self) -> int:
        # Ranks on one machine share its cores; oversubscription makes every rank slower.
        return max(1, available_cores() // self.local_world)


def setup_distributed(device: str | None) -> Dist:
    """Read torchrun's environment; join the process group when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_world, dev)


def teardown_distributed(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_tokenizer(tokenizer: CaptionTokenizer | None, d: Dist) -> CaptionTokenizer:
    """Rank 0's tokenizer on every rank (WordPiece training need not give identical ids twice)."""
    payload: list[Any] = [None]
    if d.is_main:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save(tmp)
            payload[0] = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
    dist.broadcast_object_list(payload, src=0)
    if d.is_main:
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in payload[0].items():
            (Path(tmp) / name).write_bytes(data)
        return CaptionTokenizer.from_dir(tmp)
