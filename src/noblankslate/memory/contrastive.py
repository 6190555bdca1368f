"""Training-side adaptation: InfoNCE between an example's projected anchor and its projected trajectory.

While Coconut trains, ``training.nudge_contrastive`` adds ``nudge_contrastive_weight x InfoNCE``: the key
head's projection of the anchor must pick out the trajectory head's projection of the same example
among the other examples of the batch and ``nudge_buffer_batch`` detached projections drawn from a
buffer of the last ``retrieval_buffer_limit`` ones. It teaches the key space that neighbours have similar
trajectories, which is what the nudge relies on. The heads are saved with the checkpoints
(``nudge_heads.safetensors``) and the key head becomes the memory's key map.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noblankslate.errors import NbsError


class ContrastiveHeads(nn.Module):
    """The key head (on the anchor) and the trajectory head (on the mean thought)."""

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.key = nn.Linear(hidden_size, dim)
        self.trajectory = nn.Linear(hidden_size, dim)

    def forward(self, anchors: Tensor, trajectories: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """(N, D) anchors, (N, T, D) trajectories with (N,) valid steps -> two (N, dim) unit vectors."""
        steps = torch.arange(trajectories.shape[1], device=counts.device)[None, :] < counts[:, None]  # (N, T)
        mean = (trajectories * steps[..., None]).sum(dim=1) / counts[:, None].clamp_min(1)  # (N, D)
        return F.normalize(self.key(anchors), dim=-1), F.normalize(self.trajectory(mean), dim=-1)


class TrajectoryBuffer:
    """The last ``limit`` detached trajectory projections, used as extra negatives."""

    def __init__(self, limit: int, seed: int = 0):
        self.limit = limit
        self.items: Tensor | None = None  # (M, dim)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, count: int) -> Tensor | None:
        if self.items is None or count == 0:
            return None
        chosen = torch.randperm(len(self.items), generator=self.generator)[:count]
        return self.items[chosen.to(self.items.device)]

    def push(self, projections: Tensor) -> None:
        if self.limit == 0 or len(projections) == 0:
            return
        new = projections.detach()
        self.items = new if self.items is None else torch.cat([self.items, new])
        self.items = self.items[-self.limit :]

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (saved as safetensors with the checkpoint), so a resumed run draws the same negatives."""
        state = {"generator": self.generator.get_state()}
        if self.items is not None:
            state["items"] = self.items.detach().cpu()
        return state

    def load_state_dict(self, state: dict[str, Tensor], device: torch.device | None = None) -> None:
        self.generator.set_state(state["generator"])
        items = state.get("items")
        self.items = None if items is None else items.to(device or items.device)


def thoughts_of_batch(inputs_embeds: Tensor, input_ids: Tensor, latent_id: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Anchors (N, D), trajectories (N, T - 1, D) and their counts (N,) of the rows with two or more thoughts.

    The forward's ``inputs_embeds`` carries the fed thoughts at the latent columns (aligned by the
    collator: the same first column in every row). The first thought is the anchor (the key's input); the
    trajectory is the thoughts after it. The anchor is left out of the trajectory: were it in, the key
    could find its own example by matching itself, and InfoNCE would be solved without learning anything
    about other problems (with one thought, the trajectory would be the anchor). Rows with a single
    thought have no trajectory and are left out.
    """
    is_latent = input_ids == latent_id  # (B, L)
    counts = is_latent.sum(dim=1)  # (B,)
    rows = counts > 1
    if not bool(rows.any()):
        return None
    start = int(is_latent[rows].int().argmax(dim=1).min())
    width = int(counts.max())
    thoughts = inputs_embeds[rows, start : start + width]  # (N, T, D)
    return thoughts[:, 0], thoughts[:, 1:], counts[rows] - 1


def info_nce(keys: Tensor, trajectories: Tensor, negatives: Tensor | None, temperature: float) -> Tensor:
    """Mean InfoNCE: row i's key must choose trajectory i among the batch's and the extra negatives."""
    candidates = trajectories if negatives is None else torch.cat([trajectories, negatives.to(trajectories.dtype)])
    logits = keys @ candidates.T / temperature  # (N, N + M)
    return F.cross_entropy(logits.float(), torch.arange(len(keys), device=keys.device))


class ContrastiveObjective:
    """Contrastive key training as one object: the heads, the trajectory buffer, the loss and their state.

    The training loop adds :meth:`loss` (weighted) to the LM loss of every step, averages the heads'
    gradients over ranks (they sit outside DDP/FSDP), and saves :meth:`state` with every checkpoint so that
    a resumed run continues exactly (the buffer's contents and its RNG included).

    Args:
        hidden_size: the model's hidden size (anchors and thoughts).
        key_dim: the key and projection size (``retrieval.key_dim``, or the hidden size).
        latent_id: id of ``<|latent|>`` (finds each row's thoughts in the forward's inputs).
        buffer_limit, negatives, temperature: ``training.retrieval_buffer_limit``, ``nudge_buffer_batch``
            (buffered trajectories used as extra negatives) and ``contrastive_temperature``.
        seed: seeds the heads' initialisation and the buffer's sampling.
    """

    HEADS = "nudge_heads"
    BUFFER = "nudge_buffer"

    def __init__(self, hidden_size: int, key_dim: int, latent_id: int, *, buffer_limit: int, negatives: int,
                 temperature: float, seed: int, device: torch.device,
                 gather: Callable[[Tensor], Tensor] | None = None):
        torch.manual_seed(seed + 17)
        self.heads = ContrastiveHeads(hidden_size, key_dim).to(device)
        self.buffer = TrajectoryBuffer(buffer_limit, seed=seed)
        self.latent_id, self.negatives, self.temperature, self.device = latent_id, negatives, temperature, device
        self.gather = gather or (lambda rows: rows.detach())
        """Every rank's projections of the step, in rank order (``DistributedContext.all_gather_rows``): the
        buffer holds the global batch's, so it is the same on every rank and the one a checkpoint saves
        is every rank's (same negatives drawn everywhere, exact resume). One process: the rows themselves."""

    def parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def loss(self, inputs_embeds: Tensor, input_ids: Tensor) -> Tensor | None:
        """InfoNCE of each row's key against its own trajectory (the batch's other rows and buffered
        trajectories are the negatives); None when fewer than two rows have thoughts."""
        found = thoughts_of_batch(inputs_embeds, input_ids, self.latent_id)
        if found is None or len(found[0]) < 2:
            # no loss here, but the ranks gather together: push what the others had
            self.buffer.push(self.gather(inputs_embeds.new_zeros(0, self.heads.trajectory.out_features)))
            return None
        keys, trajectories = self.heads(*found)
        loss = info_nce(keys, trajectories, self.buffer.sample(self.negatives), self.temperature)
        self.buffer.push(self.gather(trajectories))
        return loss

    def state(self) -> dict[str, dict[str, Tensor]]:
        """The checkpoint's extra states: the heads' weights and the buffer."""
        return {self.HEADS: {k: v.detach().cpu() for k, v in self.heads.state_dict().items()},
                self.BUFFER: self.buffer.state_dict()}

    def restore(self, states: dict[str, dict[str, Tensor]], where: object) -> None:
        """Resume from a checkpoint's extra states (older checkpoints without a buffer restart it empty)."""
        if self.HEADS not in states:
            raise ContrastiveStateMissing(f"{where}: training.nudge_contrastive is on but the checkpoint has no {self.HEADS}")
        self.heads.load_state_dict(states[self.HEADS])
        if self.BUFFER in states:
            self.buffer.load_state_dict(states[self.BUFFER], device=self.device)

    def key_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The learned key map's weight and bias as float32 numpy (the memory keys its entries with them)."""
        key = self.heads.key
        return key.weight.detach().float().cpu().numpy(), key.bias.detach().float().cpu().numpy()


class ContrastiveStateMissing(NbsError, ValueError):
    """A contrastive run resumed from a checkpoint that holds no contrastive heads."""

    label = "checkpoint error"
