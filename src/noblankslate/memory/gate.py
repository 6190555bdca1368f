"""A memory the model learns to use: a learned gate that mixes each thought with its retrieved target.

With ``training.memory_in_training`` the training forward reads the memory through the same thought hook
generation uses (:class:`~noblankslate.model.coconut.ThoughtController`), and the thought fed at step t is

    h~_t = h_t + g_t * (v_t - h_t),    g_t = tanh(a_t) * sigmoid(w . [h_t, v_t, c] + b)

where v_t is the neighbours' thought of step t (a constant: no gradient reaches the memory) and c the
calibrated retrieval confidence. ``a_t`` (one per thought step) and ``w``, ``b`` start at zero, so
``g = tanh(0) * 1/2 = 0`` exactly and the model starts exactly as without the memory (the zero-initialised
tanh gate of Flamingo's gated cross-attention, Alayrac et al. 2022): a sigmoid alone could only start
*near* 0, would need a large negative bias whose gradient vanishes, and would change every logit by a
little. At zero, ``a_t`` still gets the gradient of the LM loss (tanh'(0) = 1); ``w`` and ``b`` get
theirs once ``a_t`` has moved. The amplitude decides how much step t trusts the memory at all; the
sigmoid lets that depend on the thought, the target and the confidence (a close neighbour may be
trusted more). A negative amplitude moves a thought away from its target, which the loss is free to
choose. Rows without a hit, or dropped by the memory dropout, feed their thought unchanged.

:class:`GatedMemoryController` is the :class:`~noblankslate.memory.controller.MemoryController` with the
gate in place of the fixed confidence-scaled nudge; training and evaluation both use it (training with
the row's own example excluded from its neighbours and without the exit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from noblankslate.config import Config, NudgeConfig, RetrievalConfig
from noblankslate.errors import NbsError
from noblankslate.memory.controller import MemoryController, MemoryParts
from noblankslate.model.weights import read_state_dict

GATE_STATE = "memory_gate"
"""The gate's name in a checkpoint (``memory_gate.safetensors``)."""


class MemoryGate(nn.Module):
    """``g_t = tanh(amplitude[t]) * sigmoid(weight . [h, v, confidence] + bias)``, zero at initialisation.

    Args:
        hidden_size: the thought size D.
        steps: thought steps with their own amplitude (the final stage's thoughts); later steps get none.

    Parameters are created as zeros, drawing nothing from the global RNG, so a run with the option
    draws the same dropout masks and initialisation as one without it.
    """

    def __init__(self, hidden_size: int, steps: int):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.amplitude = nn.Parameter(torch.zeros(steps))
        self.weight = nn.Parameter(torch.zeros(2 * hidden_size + 1))
        self.bias = nn.Parameter(torch.zeros(()))

    @property
    def steps(self) -> int:
        return self.amplitude.shape[0]

    def forward(self, step: int, thought: Tensor, target: Tensor, confidence: Tensor) -> Tensor:
        """(B,) gate of thought ``step`` for thoughts (B, D), targets (B, D) and confidences (B,)."""
        features = torch.cat([thought.float(), target.float(), confidence.float()[:, None]], dim=-1)  # (B, 2D + 1)
        return torch.tanh(self.amplitude[step]) * torch.sigmoid(features @ self.weight + self.bias)


class GatedMemoryController(MemoryController):
    """Retrieval as :class:`MemoryController` (one search per batch at step 0), the gate as the nudge.

    Args:
        parts, retrieval, nudge: as for :class:`MemoryController`; ``nudge.alpha_max``, ``clip_radius``
            and ``match_norm`` are not used (the gate sets the step), the exit settings are.
        gate: the learned gate (its parameters get the gradient of whatever the thoughts feed).
        exit_enabled: the exit (off in training).
        count_retrievals: update the entries' ``retrieved`` counters (evaluation); training does not.

    For each training batch, :meth:`for_batch` sets which examples the rows are (their own entries are
    never their neighbours) and which rows use the memory at all (the memory dropout).
    """

    def __init__(self, parts: MemoryParts, retrieval: RetrievalConfig, nudge: NudgeConfig, gate: MemoryGate, *,
                 exit_enabled: bool = True, count_retrievals: bool = True):
        super().__init__(parts, retrieval, nudge, nudge_enabled=True, exit_enabled=exit_enabled)
        self.nudge_enabled = True  # the gate replaces alpha_max: alpha_max 0 does not switch it off
        self.gate = gate
        self.count_retrievals = count_retrievals
        self.keep: Tensor | None = None  # (B,) rows that use the memory; None: all
        self._gate_sum: np.ndarray | None = None

    def for_batch(self, examples: np.ndarray | None, keep: Tensor | None) -> GatedMemoryController:
        """Set the next batch's example ids (B,) to exclude from their own neighbours, and its kept rows."""
        self.exclude_examples = examples
        self.keep = keep
        self.record = None  # a batch whose rows have no thoughts makes no record
        return self

    def _retrieve(self, anchors: Tensor) -> None:
        super()._retrieve(anchors)
        self._gate_sum = np.zeros(anchors.shape[0])
        self.record.alpha = np.zeros(anchors.shape[0])  # the mean gate of each row's nudged steps, set below

    def _nudged(self, step: int, thought: Tensor, rows: Tensor) -> Tensor:
        """h~ = h + g * (v - h) on the rows with a target at this step (and kept); the others unchanged."""
        if step >= self.gate.steps:
            return thought
        active = rows & self._valid[:, step]  # (B,)
        if self.keep is not None:
            active = active & self.keep.to(active.device)
        target = self._targets[:, step]  # (B, D) constant
        gate = self.gate(step, thought, target, self._confidence)  # (B,)
        moved = thought + (gate[:, None] * (target - thought.float())).to(thought.dtype)
        active_np = active.cpu().numpy()
        with torch.no_grad():
            self.record.nudge_norm_sum += np.where(active_np, (moved - thought).float().norm(dim=-1).cpu().numpy(), 0.0)
            self._gate_sum += np.where(active_np, gate.float().cpu().numpy(), 0.0)
        self.record.nudges += active_np
        self.record.alpha = self._gate_sum / np.maximum(self.record.nudges, 1)  # the mean gate of the nudged steps
        return torch.where(active[:, None], moved, thought)


class GateFileError(NbsError, ValueError):
    """A checkpoint's ``memory_gate.safetensors`` does not fit the model or config it is loaded for."""

    label = "checkpoint error"


NUDGE_GATE, NUDGE_FIXED = "gate", "fixed"
"""How the memory's thoughts were mixed in (``nudge.kind`` in the metrics): the learned gate of a model
trained with ``training.memory_in_training``, or the fixed confidence-scaled nudge (``nudge.alpha_max``)."""


def gate_steps(config: Config) -> int:
    """Thought steps with their own amplitude: the final stage's thoughts (at least one)."""
    return max(1, config.max_latent_stage * config.c_thought)


def saved_gate(checkpoint: str | Path, config: Config | None = None, hidden_size: int | None = None,
               device: torch.device | str | None = None) -> MemoryGate | None:
    """The gate saved with a checkpoint of a run trained with ``training.memory_in_training`` (None if the
    checkpoint has none): the one loader for every entry point that starts from a checkpoint (training from
    ``load_model_path``, ``only_eval``, ``nbs memory build``, the sweep, the comparison tool), so they all
    evaluate with the gate the model learned.

    Args:
        checkpoint: the checkpoint folder (``memory_gate.safetensors`` beside the model).
        config, hidden_size: when given, the gate must have this run's thought steps (:func:`gate_steps`)
            and thought size; a gate from another shape would silently misread the thoughts.
        device: where the gate's parameters go (the model's device).

    Raises:
        GateFileError: the saved gate's shape differs from the run's.
    """
    path = Path(checkpoint) / f"{GATE_STATE}.safetensors"
    if not path.is_file():
        return None
    state = read_state_dict(path)
    hidden, steps = (state["weight"].shape[0] - 1) // 2, state["amplitude"].shape[0]
    expected_steps = gate_steps(config) if config is not None else steps
    expected_hidden = hidden_size if hidden_size is not None else hidden
    if (hidden, steps) != (expected_hidden, expected_steps):
        raise GateFileError(f"{path}: a gate for thoughts of size {hidden} and {steps} thought step(s); this run has "
                            f"size {expected_hidden} and {expected_steps} (max_latent_stage x c_thought)")
    gate = MemoryGate(hidden, steps)
    gate.load_state_dict(state)
    return gate.to(device) if device is not None else gate


def nudge_kind(controller: MemoryController) -> str:
    """``"gate"`` for the gated controller, ``"fixed"`` for the fixed nudge (recorded with the metrics)."""
    return NUDGE_GATE if isinstance(controller, GatedMemoryController) else NUDGE_FIXED


def memory_controller(parts: MemoryParts, retrieval: RetrievalConfig, nudge: NudgeConfig, gate: MemoryGate | None,
                      *, exit_enabled: bool = True) -> MemoryController:
    """The controller a model is evaluated with: through its learned ``gate`` if it has one (a model trained
    with the memory reads it as it learned to), else the fixed nudge of ``nudge``."""
    if gate is not None:
        return GatedMemoryController(parts, retrieval, nudge, gate, exit_enabled=exit_enabled)
    return MemoryController(parts, retrieval, nudge, exit_enabled=exit_enabled)
