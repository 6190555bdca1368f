"""The curriculum training loop: setup -> epochs (train, validation loss, generation eval, checkpoint).

Behaviour follows the original run.py, with these documented differences (docs/training.md):

* the loss of an optimizer step weights every labelled token equally across its micro-batches and
  ranks, so results do not depend on how the global batch is split (the original averaged per-batch
  means, and divided by ``gradient_accumulation_steps`` even for a shorter last group);
* with ``reset_optimizer`` the optimizer is renewed when the stage changes (the original renewed it
  every epoch; with ``epochs_per_stage: 1`` the two agree);
* evaluation scores each validation example exactly once, in batches;
* checkpoints are written after the epoch's evaluation, atomically, and a run started again in the same
  folder resumes from the latest complete one with optimizer and RNG state.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from noblankslate.config import Config, ConfigError, config_from_dict, flatten
from noblankslate.data.curriculum import (
    Features,
    prompt_view,
    scheduled_stage,
    training_view,
    validation_loss_view,
)
from noblankslate.errors import NbsError
from noblankslate.eval.evaluate import (
    GenerationEval,
    evaluate_generation,
    validation_loss,
)
from noblankslate.eval.setup import setup_run
from noblankslate.files import write_text_atomic
from noblankslate.memory.builder import LinearKeyMap, build_memory, load_memory
from noblankslate.memory.contrastive import (
    ContrastiveObjective,
)
from noblankslate.memory.controller import MemoryParts
from noblankslate.memory.evaluation import evaluate_memory
from noblankslate.memory.gate import (
    GATE_STATE,
    GatedMemoryController,
    MemoryGate,
    gate_steps,
    saved_gate,
)
from noblankslate.memory.store import MemoryFileError
from noblankslate.model.build import uses_latent_tokens
from noblankslate.model.lora import describe as describe_lora
from noblankslate.model.lora import is_adapted, trainable_parameters
from noblankslate.model.weights import read_state_dict
from noblankslate.runtime import DistributedContext, print0
from noblankslate.train.checkpoint import (
    TrainState,
    capture_rng_state,
    check_run_folder,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from noblankslate.train.lock import RunLock, RunLocked
from noblankslate.train.parallel import ParallelModel, autocast, wrap_model
from noblankslate.train.track import Tracker

PREDICTIONS_FILE = "predictions_epoch_{epoch}.jsonl"


class TrainingInterrupted(NbsError, RuntimeError):
    """SIGINT/SIGTERM stopped training after a step; ``checkpoint`` is where it can resume from."""

    label = "training interrupted"
    exit_code = 130

    def __init__(self, epoch: int, step: int, steps: int, checkpoint: Path | None):
        self.checkpoint = checkpoint
        where = f"resume point {checkpoint}" if checkpoint else "nothing saved (debug or only_eval run)"
        done = f"after epoch {epoch}" if step == steps else f"in epoch {epoch} after step {step} of {steps}"
        super().__init__(f"{done}; {where}; run the same command again to resume")


class TrainingDiverged(NbsError, RuntimeError):
    """The loss became NaN or infinite: training stops before the update, keeping the last good checkpoint."""

    label = "training stopped"
    exit_code = 1


@dataclass
class EpochResult:
    epoch: int
    stage: int
    train_loss: float | None
    val_loss: float | None
    evaluation: GenerationEval
    seconds: float
    retrieval: dict | None = None


def epoch_order(n: int, seed: int, epoch: int, context: DistributedContext) -> list[int]:
    """This rank's example order for an epoch: one seeded permutation, padded by wrapping around to a
    multiple of the world size (as DistributedSampler), then every world_size-th index."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    padded = order + order[: (-len(order)) % context.world_size]
    return padded[context.rank :: context.world_size]


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``lr``.

    A function of the step alone, so a resumed run needs no scheduler state to continue exactly.
    """
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


RESUME_SAFE_KEYS = frozenset({
    "num_epochs", "save_every_steps", "save_only_improve", "batch_size_eval", "resume", "load_model_path", "project",
    "allow_config_change", "max_new_tokens", "debug",
})
"""Keys a resumed run may change without changing what it trains (``num_epochs`` only with a constant lr:
under the cosine schedule it moves every later step's rate)."""


class ConfigChanged(NbsError, ValueError):
    """The config differs from the resumed checkpoint's in keys that change training."""

    label = "config error"


def check_resume_config(saved: dict, config: Config, checkpoint: Path) -> None:
    """Print the keys that differ from the checkpoint's config; refuse unsafe ones unless allowed."""
    before = flatten(config_from_dict(saved).to_dict())
    after = flatten(config.to_dict())
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if not changed:
        return
    safe = set(RESUME_SAFE_KEYS) - ({"num_epochs"} if config.lr_schedule != "constant" else set())
    unsafe = [k for k in changed if k not in safe]
    listing = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
    if unsafe and not config.allow_config_change:
        raise ConfigChanged(f"resuming from {checkpoint} with a different config ({listing}); {', '.join(unsafe)} "
                            "would change what the run trains: put them back, use another run name, or pass "
                            "allow_config_change=true")
    print0(f"resuming from {checkpoint} with config changes: {listing}")


def data_stage(config: Config, stage: int) -> int:
    """The stage as the training data sees it: every stage past ``max_latent_stage`` removes all steps and
    builds the same sequences, so those stages are one (the optimizer is renewed only when this changes)."""
    return min(stage, config.max_latent_stage + 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _latent_count(batch: dict[str, torch.Tensor], latent_id: int) -> int:
    return int((batch["input_ids"] == latent_id).sum(dim=1).max())


class Trainer:
    """One run: owns the model, optimizer, data views and tracker; ``run()`` goes through the epochs."""

    def __init__(self, config: Config, context: DistributedContext, memory_every_epoch: bool = True):
        """``memory_every_epoch=False`` builds and evaluates the memory after the last epoch only (the demo)."""
        seed_everything(config.seed)
        self.memory_every_epoch = memory_every_epoch
        self.config = config
        self.context = context
        self.run_dir = config.run_dir
        self.saving = not config.debug and not config.only_eval
        # One run per folder: the lock is taken before anything is read from or written to it.
        self.lock = RunLock(self.run_dir, echo=print0)
        refused: RunLocked | None = None
        if self.saving and context.is_main:
            try:
                self.lock.acquire()
            except RunLocked as error:
                refused = error
        if context.all_reduce_max(int(refused is not None)):
            raise refused or RunLocked(f"{self.run_dir} is in use by another run (see the main process's message)")
        if self.saving:
            check_run_folder(self.run_dir)
        resume_from = None if config.only_eval else latest_checkpoint(self.run_dir)
        self.start_epoch = config.resume
        self.best_accuracy = 0.0
        self.global_step = 0
        self.resume_step = 0
        self.resume_loss: list[float] | None = None
        self.stop_requested = False
        """Set by SIGINT/SIGTERM (see :meth:`run`): the current step finishes, a checkpoint is written."""

        if resume_from is not None:
            print0(f"found {resume_from}: resuming from it (the config's resume={config.resume} is ignored)")
        self.setup = setup_run(config, weights_from=resume_from)
        if self.setup.load_summary:
            print0(self.setup.load_summary)
        if is_adapted(self.setup.model.base_causallm):
            print0(describe_lora(self.setup.model.base_causallm))
        built_model = self.setup.model
        self.parallel: ParallelModel = wrap_model(built_model, config, context)
        self.contrastive: ContrastiveObjective | None = None
        if config.training.nudge_contrastive:
            if not (config.coconut and built_model.feed_thoughts):
                raise ValueError("training.nudge_contrastive needs coconut thoughts (not cot, pause or no_thoughts)")
            hidden, training = built_model.base_causallm.config.hidden_size, config.training
            self.contrastive = ContrastiveObjective(
                hidden, config.retrieval.key_dim or hidden, self.setup.latent_ids.latent_id,
                buffer_limit=training.retrieval_buffer_limit, negatives=training.nudge_buffer_batch,
                temperature=training.contrastive_temperature, seed=config.seed, device=context.device,
                gather=context.all_gather_rows)
            saved_heads = Path(config.load_model_path or "") / f"{ContrastiveObjective.HEADS}.safetensors"
            if resume_from is None and config.load_model_path and saved_heads.is_file():
                self.contrastive.heads.load_state_dict(read_state_dict(saved_heads))
        self.gate: MemoryGate | None = None
        self.training_memory: GatedMemoryController | None = None
        """The memory the next latent training epoch reads: built by the previous epoch's model."""
        self.exclude_own = self.setup.memory_examples is self.setup.train
        """The memory is built from the training file, so a row's own entry is dropped from its neighbours."""
        if config.training.memory_in_training:
            if not built_model.feed_thoughts:  # the config refuses this already; the model is the authority
                raise ConfigError("training.memory_in_training needs a model that feeds continuous thoughts")
            hidden = built_model.base_causallm.config.hidden_size
            # a run started from a checkpoint (load_model_path, only_eval too) continues with the gate saved
            # beside it; a resumed run loads its own from the checkpoint's state below
            saved = (saved_gate(config.load_model_path, config, hidden) if resume_from is None and config.load_model_path
                     else None)
            self.gate = (saved if saved is not None else MemoryGate(hidden, gate_steps(config))).to(context.device)
        if self.contrastive is not None:
            self.parallel.outside[ContrastiveObjective.HEADS] = self.contrastive.heads
        if self.gate is not None:
            self.parallel.outside[GATE_STATE] = self.gate
        self.optimizer = self._new_optimizer()
        per_rank = math.ceil(len(self.setup.train_tokens) / context.world_size)
        steps_per_epoch = math.ceil(math.ceil(per_rank / config.batch_size_training) / config.gradient_accumulation_steps)
        self.total_steps = steps_per_epoch * config.num_epochs

        if resume_from is not None:
            checkpoint = load_checkpoint(resume_from)
            check_resume_config(checkpoint.config, config, resume_from)
            self.start_epoch = checkpoint.epoch
            self.best_accuracy = checkpoint.train_state.best_accuracy
            self.global_step = checkpoint.train_state.global_step
            # a mid-epoch checkpoint: that many steps of epoch start_epoch + 1 are done, with this loss so far
            self.resume_step = checkpoint.train_state.step_in_epoch
            self.resume_loss = checkpoint.train_state.epoch_loss
            if checkpoint.optimizer_state is not None:
                self.parallel.load_optimizer_state(self.optimizer, checkpoint.optimizer_state)
            if checkpoint.rng_state is not None:
                restore_rng_state(checkpoint.rng_state)
            if self.contrastive is not None:
                self.contrastive.restore(checkpoint.extra_states, resume_from)
            if self.gate is not None:
                if GATE_STATE in checkpoint.extra_states:
                    self.gate.load_state_dict(checkpoint.extra_states[GATE_STATE])
                else:  # only with allow_config_change (the option is a training key)
                    print0(f"{resume_from} has no {GATE_STATE}: the memory gate starts at zero")
                self._resume_training_memory(checkpoint.train_state.training_memory, resume_from)
        if context.is_main and self.saving:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.run_dir / "config.yaml")
        self.tracker = Tracker(self.run_dir, config, active=context.is_main and not config.debug)
        if resume_from is not None:
            dropped = self.tracker.forget_after(self.start_epoch, self.global_step)
            if dropped:
                print0(f"{self.run_dir / 'metrics.jsonl'}: dropped {dropped} records logged after {resume_from.name} "
                       "(the interrupted epoch runs again)")

    def _new_optimizer(self) -> torch.optim.Optimizer:
        # Frozen weights (the base model under LoRA) get no optimizer state.
        parameters = trainable_parameters(self.parallel.wrapped)
        if self.contrastive is not None:
            parameters += self.contrastive.parameters()
        if self.gate is not None:
            parameters += list(self.gate.parameters())
        return torch.optim.AdamW(parameters, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _latent_passes(self, batch: dict[str, torch.Tensor]) -> int | None:
        """Under FSDP, the largest latent count over all ranks, so every rank runs the same passes."""
        if not self.parallel.lockstep or not self.parallel.model.feed_thoughts:
            return None
        return self.context.all_reduce_max(_latent_count(batch, self.setup.latent_ids.latent_id))

    def _forward_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM loss summed over labelled tokens, and the contrastive loss (mean over rows) if on.

        ``batch`` holds the collated tensors and the forward's ``controller`` (the training memory, or None).
        """
        with autocast(self.config, self.context, self.parallel.kind):
            out = self.parallel.wrapped(**batch, return_logits=False, reduction="sum", latent_passes=self._latent_passes(batch))
            contrastive = (self.contrastive.loss(out.inputs_embeds, batch["input_ids"])
                           if self.contrastive is not None else None)
        return out.loss, contrastive

    def _training_controller(self, parts: MemoryParts) -> GatedMemoryController:
        return GatedMemoryController(parts, self.config.retrieval, self.config.nudge, self.gate, exit_enabled=False,
                                     count_retrievals=False)

    def _set_training_memory(self, parts: MemoryParts) -> None:
        self.training_memory = self._training_controller(parts)

    def _resume_training_memory(self, fingerprint: str | None, checkpoint: Path) -> None:
        """Load the memory the checkpoint's next (or interrupted) epoch reads, by its model's fingerprint."""
        if fingerprint is None:  # none was built yet (stage 0): the next latent epoch builds it
            return
        try:
            self._set_training_memory(load_memory(self.config.index.path, fingerprint))
        except MemoryFileError as error:
            exact = "exact" if not self.resume_step else "not exact: the resumed model is not the one that built it"
            print0(f"{checkpoint}: the memory its run was reading is not at {self.config.index.path} ({error}); it is "
                   f"rebuilt with the resumed model before training ({exact})")

    def _prepare_training_memory(self, epoch: int) -> None:
        """At a latent epoch with no memory from the previous epoch (the first one, or after an epoch that
        built none), build one with the current model, which is the previous epoch's."""
        if self.training_memory is not None:
            return
        print0(f"epoch {epoch + 1}: building the memory for training with the model of epoch {epoch}")
        with self.parallel.gathered() as model, autocast(self.config, self.context, self.parallel.kind):
            built = build_memory(model, self.setup, self.context, lockstep=self.parallel.lockstep, epoch=epoch,
                                 key_head=self.key_head())
        self._set_training_memory(built.parts)

    def _batch_controller(self, examples: torch.Tensor | None, rows: int, micro: int) -> GatedMemoryController | None:
        """The training memory for one micro-batch: its rows' own examples excluded, and the memory dropout
        drawn per row from a generator seeded by (seed, step, micro-batch, rank), a function of the step
        alone like the learning rate, so a resumed run draws the same masks with no state to save."""
        if self.training_memory is None:
            return None
        rng = np.random.default_rng([self.config.seed, self.global_step, micro, self.context.rank])
        keep = torch.as_tensor(rng.random(rows) >= self.config.training.memory_dropout, device=self.context.device)
        own = examples.numpy() if self.exclude_own and examples is not None else None
        return self.training_memory.for_batch(own, keep)

    def _micro_batches(self, view: list[Features], epoch: int) -> list[list[Features]]:
        order = epoch_order(len(view), self.config.seed, epoch, self.context)
        size = self.config.batch_size_training
        return [[view[i] for i in order[j : j + size]] for j in range(0, len(order), size)]

    def train_epoch(self, epoch: int, stage: int) -> float:
        """One epoch of optimizer steps; returns the mean loss per labelled token."""
        view = training_view(self.setup.train_tokens, stage, self.setup.spec, self.config.seed, epoch)
        micro = self._micro_batches(view, epoch)
        accumulation = self.config.gradient_accumulation_steps
        groups = [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]
        device = self.context.device
        self.parallel.wrapped.train()
        epoch_loss = torch.zeros(2, dtype=torch.float64)  # loss sum, tokens (all ranks)
        skip = 0
        if epoch == self.start_epoch and self.resume_step:  # resumed mid-epoch: those steps are done
            skip, self.resume_step = self.resume_step, 0
            epoch_loss = torch.tensor(self.resume_loss, dtype=torch.float64)
        bar = tqdm(total=len(groups), initial=skip, desc=f"epoch {epoch + 1}/{self.config.num_epochs} stage {stage}",
                   disable=not self.context.is_main, dynamic_ncols=True)
        started = time.perf_counter()
        every = self.config.save_every_steps
        for index, group in enumerate(groups):
            if index < skip:
                continue
            collated = [self.setup.collate(f) for f in group]
            examples = [c.pop("idx", None) for c in collated]  # (B,) example indices (their own memory entries)
            batches = [{k: v.to(device) for k, v in c.items()} for c in collated]
            tokens = float(self.context.all_reduce_sum([sum(_labelled_tokens(b) for b in batches)])[0])
            step_loss, step_contrastive, memory_rows = 0.0, [], []
            for j, batch in enumerate(batches):
                controller = self._batch_controller(examples[j], len(batch["input_ids"]), j)
                with self.parallel.gradient_sync(j == len(batches) - 1):
                    loss_sum, contrastive = self._forward_sum({**batch, "controller": controller})
                    # DDP/FSDP average gradients over ranks; scaling by world_size / global tokens makes the
                    # result the gradient of the token-mean loss of the whole global batch.
                    loss = loss_sum * (self.context.world_size / max(tokens, 1.0))
                    if contrastive is not None:
                        loss = loss + self.config.training.nudge_contrastive_weight * contrastive / len(batches)
                        step_contrastive.append(float(contrastive.detach()))
                    loss.backward()
                step_loss += float(loss_sum.detach())
                if controller is not None and controller.record is not None:
                    memory_rows.append(float(np.mean(controller.record.nudges > 0)))
            if self.contrastive is not None:
                self.context.average_gradients(self.contrastive.heads)  # the heads are outside DDP/FSDP
            if self.gate is not None:
                self.context.average_gradients(self.gate)
            lr = self.config.lr * lr_factor(self.global_step, self.total_steps, self.config.lr_schedule,
                                            self.config.warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # Reduced before the step, so that every rank sees a non-finite loss and none applies its update.
            reduced = self.context.all_reduce_sum([step_loss, tokens / self.context.world_size])
            if not math.isfinite(float(reduced[0])):
                bar.close()
                last = latest_checkpoint(self.run_dir)
                raise TrainingDiverged(
                    f"epoch {epoch + 1}, step {self.global_step + 1}: the loss is {float(reduced[0])} (lr {lr:g}); stopped "
                    f"before the update. The last good checkpoint is {last or 'none (nothing was saved yet)'}; lower lr "
                    "and run again (a run started in this folder resumes from that checkpoint)")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            epoch_loss += reduced.cpu()
            loss_value = float(reduced[0] / reduced[1]) if reduced[1] else float("nan")
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{float(epoch_loss[1]) / (time.perf_counter() - started):.0f}")
            record = {"event": "step", "epoch": epoch + 1, "stage": stage, "step": self.global_step, "train_loss": loss_value,
                      "lr": lr}
            if step_contrastive:
                record["contrastive_loss"] = sum(step_contrastive) / len(step_contrastive)
            if memory_rows:  # share of rows whose thoughts the memory reached (a hit, not dropped)
                record["memory_rows"] = sum(memory_rows) / len(memory_rows)
            self.tracker.log(record)
            stop = bool(self.context.all_reduce_max(int(self.stop_requested)))  # every rank stops at the same step
            done = index + 1
            if self.saving and done < len(groups) and (stop or (every and self.global_step % every == 0)):
                self._save(epoch, stage, step_in_epoch=done, epoch_loss=epoch_loss.tolist())
            if stop and done < len(groups):  # on the epoch's last step, the epoch finishes and saves first
                bar.close()
                raise TrainingInterrupted(epoch + 1, done, len(groups),
                                          self.run_dir / checkpoint_name(epoch, done) if self.saving else None)
        bar.close()
        return float(epoch_loss[0] / epoch_loss[1]) if epoch_loss[1] else float("nan")

    def evaluate(self, epoch: int, stage: int) -> tuple[float | None, GenerationEval]:
        val_loss = None
        if not self.config.only_eval:
            features = validation_loss_view(self.setup.val_tokens, stage, self.setup.spec, self.config.seed, epoch)
            with autocast(self.config, self.context, self.parallel.kind):
                val_loss = validation_loss(self.parallel.wrapped, features, self.setup.collate,
                                           batch_size=self.config.batch_size_training, context=self.context,
                                           latent_passes=self._latent_passes)
        started = time.perf_counter()
        evaluation = self._generate(stage)
        self.generation_seconds = time.perf_counter() - started
        return val_loss, evaluation

    def _generate(self, stage: int, controller=None) -> GenerationEval:
        prompts = prompt_view(self.setup.val_tokens, stage, self.setup.spec)
        with self.parallel.gathered() as model, autocast(self.config, self.context, self.parallel.kind):
            return evaluate_generation(
                model, self.setup.tokenizer, self.setup.val, prompts, self.setup.collate,
                batch_size=self.config.batch_size_eval or self.config.batch_size_training,
                max_new_tokens=self.config.resolved_max_new_tokens, context=self.context,
                lockstep=self.parallel.lockstep, controller=controller, step_separator=self.config.step_separator,
            )

    def key_head(self) -> LinearKeyMap | None:
        """The learned key map of the contrastive heads, for the memory (None without them)."""
        if self.contrastive is None:
            return None
        return LinearKeyMap(*self.contrastive.key_weights())

    def memory_epoch(self, epoch: int, stage: int, off: GenerationEval) -> dict | None:
        """Rebuild the memory from training data with this epoch's model, then evaluate with it, paired
        with the plain evaluation ``off``, and write ``retrieval_metrics_epoch_{E}.json``."""
        config = self.config
        # the model trained with its memory is evaluated with the gate it learned (self.gate), else the fixed nudge
        with self.parallel.gathered() as model, autocast(config, self.context, self.parallel.kind):
            metrics, _ = evaluate_memory(model, self.setup, self.context, epoch=epoch + 1, stage=stage, off=off,
                                         off_seconds=self.generation_seconds, lockstep=self.parallel.lockstep,
                                         key_head=self.key_head(), metrics_dir=self.run_dir, gate=self.gate,
                                         on_built=self._set_training_memory if self.gate is not None else None)
        if metrics is None:
            return None
        self.tracker.log({"event": "retrieval", "epoch": epoch + 1,
                          "accuracy_with_retrieval": metrics["accuracy"]["with_retrieval"],
                          "mean_forward_passes_with_exit": metrics["exit"]["mean_forward_passes_with_exit"],
                          "ece": metrics["calibration"]["ece"], "brier": metrics["calibration"]["brier"],
                          "index_entries": metrics["index"]["entries"]})
        a, e = metrics["accuracy"], metrics["exit"]
        print0(f"memory (epoch {epoch + 1}): {metrics['index']['entries']} entries, accuracy {a['without_retrieval']:.4f} -> "
               f"{a['with_retrieval']:.4f}, passes {e['mean_forward_passes_without_exit']:.2f} -> "
               f"{e['mean_forward_passes_with_exit']:.2f}, false exits {e['false_exits']}, "
               f"ECE {metrics['calibration']['ece']:.3f}"
               + (f", exit probe ECE {metrics['exit_calibration']['ece']:.3f}" if metrics["exit_calibration"]["available"] else ""))
        return metrics

    def _write_predictions(self, epoch: int, evaluation: GenerationEval) -> None:
        if not self.context.is_main or self.config.debug:
            return
        path = self.run_dir / PREDICTIONS_FILE.format(epoch=epoch + 1)
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in evaluation.predictions))

    def _save(self, epoch: int, stage: int, step_in_epoch: int = 0, epoch_loss: list[float] | None = None) -> None:
        """Write ``checkpoint_{epoch + 1}`` after an epoch, or ``checkpoint_{epoch}_step_{k}`` after k of its steps."""
        plain = not uses_latent_tokens(self.config)  # CoT-style runs save plain causal-LM keys, as the original
        model_state = self.parallel.full_state_dict(plain_causallm=plain)
        optimizer_state = self.parallel.optimizer_state(self.optimizer)
        if self.context.is_main:
            training_memory = None
            if self.gate is not None and self.training_memory is not None:  # what the next (or this interrupted) epoch reads
                training_memory = self.training_memory.parts.store.fingerprint
            extra = {}
            if self.contrastive is not None:
                extra.update(self.contrastive.state())
            if self.gate is not None:
                extra[GATE_STATE] = {k: v.detach().cpu() for k, v in self.gate.state_dict().items()}
            done = epoch if step_in_epoch else epoch + 1
            save_checkpoint(
                self.run_dir, done, step_in_epoch=step_in_epoch, model_state=model_state,
                optimizer_state=optimizer_state, rng_state=capture_rng_state(),
                train_state=TrainState(epoch=done, stage=stage, global_step=self.global_step,
                                       best_accuracy=self.best_accuracy, step_in_epoch=step_in_epoch,
                                       epoch_loss=epoch_loss if step_in_epoch else None,
                                       training_memory=training_memory),
                config=self.config, tokenizer=self.setup.tokenizer,
                extra_states=extra or None,
            )
        self.context.barrier()

    def run(self) -> list[EpochResult]:
        """All epochs. SIGINT or SIGTERM lets the current step finish, writes a mid-epoch checkpoint and
        raises :class:`TrainingInterrupted` (a second SIGINT interrupts at once)."""
        previous = {}

        def request_stop(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True
            print0(f"\n{signal.Signals(signum).name}: stopping after this step (a checkpoint will be written)")

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, request_stop)
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.lock.release()

    def _run(self) -> list[EpochResult]:
        config = self.config
        results = []
        last_epoch = self.start_epoch + 1 if config.only_eval else config.num_epochs
        for epoch in range(self.start_epoch, last_epoch):
            started = time.perf_counter()
            stage = scheduled_stage(config, epoch)
            train_loss = None
            # A memory of thoughts needs thoughts: none is built, read or evaluated at a stage without them (stage 0).
            thinking_stage = stage > 0 and self.setup.spec.c_thought > 0
            if not config.only_eval:
                resumed_mid_epoch = epoch == self.start_epoch and self.resume_step > 0  # the reset is behind us
                if (config.reset_optimizer and epoch > 0 and not resumed_mid_epoch
                        and data_stage(config, stage) != data_stage(config, scheduled_stage(config, epoch - 1))):
                    self.optimizer = self._new_optimizer()
                if self.gate is not None and thinking_stage:
                    self._prepare_training_memory(epoch)
                train_loss = self.train_epoch(epoch, stage)
            val_loss, evaluation = self.evaluate(epoch, stage)
            result = EpochResult(epoch + 1, stage, train_loss, val_loss, evaluation, time.perf_counter() - started)
            results.append(result)
            self._report(result)
            self.training_memory = None  # the next epoch reads the memory of this epoch's model, built next
            if config.retrieval.enabled and thinking_stage and (self.memory_every_epoch or epoch + 1 == last_epoch):
                result.retrieval = self.memory_epoch(epoch, stage, evaluation)
            self._write_predictions(epoch, evaluation)
            improved = evaluation.accuracy > self.best_accuracy
            self.best_accuracy = max(self.best_accuracy, evaluation.accuracy)
            if self.saving and (improved or not config.save_only_improve):
                self._save(epoch, stage)
            if self.stop_requested and epoch + 1 < last_epoch:
                steps = self.global_step  # the epoch is complete
                raise TrainingInterrupted(epoch + 1, steps, steps, latest_checkpoint(self.run_dir) if self.saving else None)
        self.tracker.close()
        if self.context.is_main:
            print(summary_table(results, config.variant), flush=True)
        return results

    def _report(self, result: EpochResult) -> None:
        e = result.evaluation
        record = {
            "event": "epoch", "epoch": result.epoch, "stage": result.stage, "train_loss": result.train_loss,
            "val_loss": result.val_loss, "accuracy": e.accuracy, "cot_match": e.cot_match, "correct": e.correct,
            "total": e.total, "mean_generated_tokens": e.mean_generated_tokens,
            "mean_forward_passes": e.mean_forward_passes, "seconds": result.seconds,
        }
        self.tracker.log(record)
        loss = "" if result.train_loss is None else f"train loss {result.train_loss:.4f}  val loss {result.val_loss:.4f}  "
        print0(f"epoch {result.epoch} (stage {result.stage}): {loss}accuracy {e.correct}/{e.total} = {e.accuracy:.4f}  "
               f"CoT match {e.cot_match:.4f}  tokens {e.mean_generated_tokens:.1f}  passes {e.mean_forward_passes:.1f}")


def summary_table(results: Sequence[EpochResult], variant: str) -> str:
    """A plain text table of the run, one row per epoch."""
    header = f"{'method':<24}{'epoch':>6}{'stage':>6}{'train loss':>11}{'val loss':>10}{'accuracy':>10}{'CoT EM':>8}{'tokens':>8}{'passes':>8}"
    lines = [header, "-" * len(header)]
    fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
    for r in results:
        e = r.evaluation
        lines.append(f"{variant:<24}{r.epoch:>6}{r.stage:>6}{fmt(r.train_loss):>11}{fmt(r.val_loss):>10}"
                     f"{e.accuracy:>10.4f}{e.cot_match:>8.3f}{e.mean_generated_tokens:>8.1f}{e.mean_forward_passes:>8.1f}")
    return "\n".join(lines)


def train(config: Config, context: DistributedContext) -> list[EpochResult]:
    """Setup, run all epochs, return the per-epoch results (the process group is the caller's)."""
    return Trainer(config, context).run()
