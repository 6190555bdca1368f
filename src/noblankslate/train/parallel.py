"""Wrapping the model for several processes: DDP, or FSDP (``fully_shard`` per decoder layer).

One process: the model as it is. Several: DDP replicates it (GPT-2-sized models); FSDP shards each
decoder layer and the rest (embeddings, final norm, LM head) at the root, which is the
:class:`~noblankslate.model.coconut.Coconut` wrapper, so one call of the wrapper gathers the root's
parameters for all its passes. Full (unsharded) state dicts are gathered on every rank for saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from noblankslate.config import Config
from noblankslate.model.coconut import Coconut
from noblankslate.runtime import DistributedContext


@dataclass
class ParallelModel:
    """The module to call for training (``wrapped``) and the plain Coconut inside it (``model``)."""

    wrapped: nn.Module
    model: Coconut
    kind: str  # "single", "ddp" or "fsdp"
    outside: dict[str, nn.Module] = field(default_factory=dict)
    """Modules the optimizer trains beside the model, outside its wrapper (the memory gate, the contrastive
    heads), by name: FSDP's optimizer state names every parameter through a module, so they must be named."""

    @property
    def lockstep(self) -> bool:
        """Whether every rank must run the same forward calls (FSDP gathers weights inside them)."""
        return self.kind == "fsdp"

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation group."""
        if self.kind == "ddp" and not enabled:
            return self.wrapped.no_sync()
        if self.kind == "fsdp":
            self.wrapped.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[Coconut]:
        """The full model for code that does not go through ``forward`` (generation)."""
        if self.kind == "fsdp":
            self.wrapped.unshard()
            try:
                yield self.model
            finally:
                self.wrapped.reshard()
        else:
            yield self.model

    def full_state_dict(self, plain_causallm: bool) -> dict[str, torch.Tensor]:
        """Unsharded weights on CPU: ``base_causallm.*`` keys, or the causal LM's own keys."""
        module: nn.Module = self.model.base_causallm if plain_causallm else self.model
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if plain_causallm:
                prefix = "base_causallm."
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            return state
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self._optimized(), optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if self.kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self._optimized(), optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)


    def _optimized(self) -> nn.Module:
        """One module holding every parameter the optimizer trains, for FSDP's optimizer state dict."""
        return _WithOutside(self.wrapped, self.outside) if self.outside else self.wrapped


class _WithOutside(nn.Module):
    """The wrapped model's parameters and submodules under their own names, plus the modules trained
    outside the wrapper under theirs.

    ``get_optimizer_state_dict`` finds each optimized parameter's name in the module it is given and fails
    on one it cannot name (the gate's, KeyError), so it is given this view: the model's names are
    unchanged (a checkpoint's optimizer state keeps its keys), the outside modules' are added.
    """

    def __init__(self, wrapped: nn.Module, outside: dict[str, nn.Module]):
        super().__init__()
        for name, parameter in wrapped.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, child in wrapped.named_children():
            self.add_module(name, child)
        for name, module in outside.items():
            if name in self._modules or name in self._parameters:
                raise ValueError(f"{name!r} is already a name in the model")
            self.add_module(name, module)


def decoder_layers(model: Coconut) -> list[nn.Module]:
    """The repeated transformer blocks of any Hugging Face causal LM (GPT-2 ``h``, Llama ``layers``)."""
    body = model.base_causallm.base_model
    for name in ("layers", "h", "blocks", "layer"):
        layers = getattr(body, name, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the decoder layers of {type(body).__name__} to shard")


def choose_kind(config: Config, model: Coconut, context: DistributedContext) -> str:
    if not context.is_distributed:
        return "single"
    if config.parallel != "auto":
        return config.parallel
    return "ddp" if model.base_causallm.config.model_type == "gpt2" else "fsdp"


def wrap_model(model: Coconut, config: Config, context: DistributedContext) -> ParallelModel:
    """Move the model to this rank's device and wrap it for the chosen parallelism.

    bf16 (GPU only) is mixed precision: float32 master weights, bfloat16 compute (FSDP's
    ``MixedPrecisionPolicy``, or autocast around the forward for one process and DDP). ``bf16_weights``
    instead casts every parameter and buffer to bfloat16 here, before wrapping, as the original did: the
    optimizer then holds bfloat16 state too.
    """
    kind = choose_kind(config, model, context)
    model.to(context.device)
    if config.bf16_weights:
        model.to(torch.bfloat16)
    if kind == "single":
        return ParallelModel(wrapped=model, model=model, kind=kind)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.local_rank] if context.device.type == "cuda" else None
        return ParallelModel(wrapped=DistributedDataParallel(model, device_ids=device_ids), model=model, kind=kind)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(context.device.type, (context.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if uses_bf16(config, context) else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return ParallelModel(wrapped=model, model=model, kind=kind)


def uses_bf16(config: Config, context: DistributedContext) -> bool:
    """Mixed precision applies: bf16 on a GPU, and the weights not already cast (``bf16_weights``)."""
    return config.bf16 and not config.bf16_weights and context.device.type == "cuda"


def autocast(config: Config, context: DistributedContext, kind: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for one process and DDP on GPU (FSDP casts through its policy instead)."""
    if uses_bf16(config, context) and kind != "fsdp":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
