"""Process-group setup and teardown, in pairs, with the same code path for one CPU process.

Under ``torchrun`` the environment names rank and world size; the backend is nccl on GPUs and gloo on
CPU. Without ``torchrun`` no process group is created and the collectives below are no-ops, so one
process on a laptop runs exactly the code that many GPUs run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Sum a vector of numbers over ranks (float64 on this process's device; exact for counts)."""
        tensor = torch.as_tensor(values, dtype=torch.float64, device=self.device).clone()
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.long, device=self.device)
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (small picklable objects only: predictions, stats)."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``(n_r, ...)`` rows (detached) concatenated in rank order; ``n_r`` may differ, and 0
        rows is fine. Every rank must call it at the same point, whatever it holds."""
        rows = rows.detach()
        if not self.is_distributed:
            return rows
        counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.long, device=self.device))
        sizes = [int(count.item()) for count in counts]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: len(rows)] = rows
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)])

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Average the gradients of a module that no DDP/FSDP wrapper synchronises.

        A rank whose step gave a parameter no gradient (say, no row of its micro-batch had two thoughts for
        the contrastive loss) takes part with zeros while another rank has one, so every rank runs the same
        collectives (otherwise they would wait on each other forever); where no rank has one, it stays None.
        """
        if not self.is_distributed:
            return
        parameters = list(module.parameters())
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.long, device=self.device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        for parameter, anywhere in zip(parameters, present.tolist()):
            if not anywhere:
                continue
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad /= self.world_size

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def print0(*args: Any, **kwargs: Any) -> None:
    """Print on rank 0 only (reads RANK so it works before the context exists)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@contextmanager
def distributed_context() -> Iterator[DistributedContext]:
    """Create the process group when launched by torchrun, and always destroy what was created."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(local_rank)
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        created = True
    try:
        yield DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
        if created:
            # Every rank tears down together. Without this a rank that finished first (rank 0 still writes
            # files) exited while its peer was alive, and 3 of 85 two-process gloo runs died at exit
            # with "terminate called without an active exception" (SIGABRT, after all its work was saved).
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
