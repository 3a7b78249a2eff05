"""The processes of one quantization run, and the few collectives the block loop needs.

One process is a ``Ranks`` of size 1 whose collectives return their input: the single-process path computes
exactly what it computed before distribution existed. Under ``torchrun`` (or ``lowbit quantize --nproc N``, which
starts the same environment) each process is one rank of a torch.distributed process group: gloo on CPUs, NCCL on
GPUs. Calibration batches are dealt round-robin (global batch b runs on rank b % size), every statistic is reduced
over ranks, and per-Linear work is split and broadcast; see docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lowbit.errors import LowbitError

# how long a rank waits in a collective for the others: a rank that stopped without closing its connections (a
# NCCL hang, a lost node) ends the run after this long instead of never; the slowest single step between two
# collectives (GPTQ of a 70B model's largest Linear on CPU) stays well inside it
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


class RankLost(LowbitError):
    """A collective failed because another rank stopped: the run ends; the launcher reports the rank that failed
    first, not this consequence of it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes. ``device`` is where collective tensors live (NCCL needs
    them on this rank's GPU; gloo takes CPU tensors); ``work_device`` is where this rank computes, where whatever
    it receives is put."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    work_device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the output (one rank writes; the others write nothing)."""
        return self.rank == 0

    def batches(self, n_batches: int) -> list[int]:
        """The global calibration batch numbers this rank runs: b with b % size == rank."""
        return list(range(self.rank, n_batches, self.size))

    # ---- collectives (each rank must call them in the same order; one process: identity)
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place as the sum over ranks."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def sum_floats(self, values: list[float]) -> list[float]:
        """Python floats summed over ranks (in float64: the sum is independent of how they were batched)."""
        if not self.distributed:
            return values
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, tensors moved to the CPU), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        self._call(dist.all_gather_object, out, moved(obj, "cpu"))
        return [moved(o, self.work_device) for o in out]

    def broadcast(self, obj: Any, src: int) -> Any:
        """Rank ``src``'s ``obj`` on every rank (tensors and modules, also inside tuples, lists, dicts and
        dataclasses, arrive on this rank's work device)."""
        if not self.distributed:
            return obj
        box = [moved(obj, "cpu") if self.rank == src else None]  # pickled tensors would keep the sender's GPU
        self._call(dist.broadcast_object_list, box, src=src)
        return moved(box[0], self.work_device)

    def barrier(self) -> None:
        if self.distributed:
            self._call(dist.barrier)

    def check_same(self, what: str, facts: dict[str, Any]) -> None:
        """Refuse a run whose ranks were given different inputs (``facts``: JSON-able, or tensors hashed here):
        every rank raises the same one line naming the first fact that differs."""
        if not self.distributed:
            return
        digests = {key: _digest(value) for key, value in facts.items()}
        every = self.gather(digests)
        for key in digests:
            values = [d[key] for d in every]
            if len(set(values)) > 1:
                groups: dict[str, list[int]] = {}
                for r, v in enumerate(values):
                    groups.setdefault(v, []).append(r)
                split = " vs ".join("ranks " + ",".join(map(str, rs)) for rs in groups.values())
                raise LowbitError(
                    f"the ranks of this run were given different {what}: {key} differs ({split}); start every rank "
                    "with the same model, recipe and calibration options"
                )

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        if not self.distributed:
            return tensor
        if tensor.device == self.device:
            self._call(dist.all_reduce, tensor, op=op)
        else:  # e.g. statistics on a GPU reduced through gloo
            carrier = tensor.to(self.device)
            self._call(dist.all_reduce, carrier, op=op)
            tensor.copy_(carrier)
        return tensor

    def _call(self, collective: Any, *args: Any, **kwargs: Any) -> None:
        try:
            collective(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, dist.DistError) as exc:  # gloo: RuntimeError "Connection closed by peer"; NCCL: timeout
            raise RankLost(
                f"rank {self.rank} of {self.size} lost contact with another rank ({str(exc).splitlines()[0][:120]}); "
                "the rank that failed first says why"
            ) from None


SINGLE = Ranks()


def moved(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor and module in it on ``device`` (modules are moved in place)."""
    if isinstance(obj, nn.Module):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: moved(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (tuple, list)):
        return type(obj)(moved(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: moved(v, device) for k, v in obj.items()}
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


def _digest(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous()
        return hashlib.sha256(str((data.dtype, tuple(data.shape))).encode() + data.view(torch.uint8).numpy().tobytes()
                              ).hexdigest()
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun's environment gives them; (0, 1, 0) without one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise LowbitError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; start lowbit with torchrun or --nproc")
    if world < 1 or not 0 <= rank < world:
        raise LowbitError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world}); start lowbit with torchrun or --nproc")
    return rank, world, local


def join_ranks(device: torch.device) -> tuple[Ranks, torch.device]:
    """This process's ``Ranks`` and its work device. Without torchrun's environment (or with WORLD_SIZE=1): one
    process, ``device`` unchanged. Otherwise joins the process group (NCCL when ``device`` is a GPU, gloo on CPUs),
    each rank on GPU LOCAL_RANK; an already initialised default group (the Python API under torchrun) is used."""
    rank, world, local = launched_world()
    if world == 1 and not dist.is_initialized():
        return SINGLE, device
    if device.type == "cuda":
        if device.index is not None and world > 1:
            raise LowbitError(
                f"--device {device} with {world} ranks: each rank takes the GPU of its LOCAL_RANK; pass --device cuda"
            )
        device = torch.device("cuda", local)
        if local >= torch.cuda.device_count():
            raise LowbitError(f"rank {rank} has LOCAL_RANK {local} but this machine shows "
                              f"{torch.cuda.device_count()} GPU(s); start at most one rank per GPU")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                device_id=device if device.type == "cuda" else None,
            )
        except (RuntimeError, ValueError, dist.DistError) as exc:
            raise LowbitError(
                f"rank {rank} could not join the process group ({str(exc).splitlines()[0][:160]}); check MASTER_ADDR "
                "and MASTER_PORT (torchrun sets them) and that every rank started"
            ) from None
    return current_ranks(device), device


def current_ranks(device: torch.device | str = "cpu") -> Ranks:
    """The ranks of the default process group the caller initialised (under torchrun) with this rank computing on
    ``device`` ("cuda" means this rank's GPU, LOCAL_RANK); one process when there is no such group. Pass it to
    ``lowbit.quantize(..., ranks=current_ranks(device))`` on every rank to divide the calibration among them."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return SINGLE
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    work = torch.device(device)
    if work.type == "cuda" and work.index is None:
        work = torch.device("cuda", local)
    collective = work if "nccl" in str(dist.get_backend()) and work.type == "cuda" else torch.device("cpu")
    return Ranks(rank, world, local, collective, work)


def leave_ranks() -> None:
    """Leave the process group at the end of a run (torch warns when a process exits inside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
