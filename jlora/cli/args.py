"""The typed configuration of every ``jlora`` subcommand: one frozen dataclass each.

tyro turns these into flags (``--lora.rank 8``) and help text (the field docstrings); a
YAML/JSON file given with ``--config`` sets the same fields and flags override it
(:mod:`jlora.cli.parse`). Checks that need no file run in ``__post_init__`` and raise
:class:`~jlora.errors.ConfigError`, which the command line prints as one line.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Literal

import tyro

from jlora.config import LoraConfig
from jlora.errors import ConfigError
from jlora.paths import ALL_LINEAR

Task = Literal["causal-lm", "embedding"]


def _positive(owner: object, *names: str, allow_none: bool = False) -> None:
    for name in names:
        v = getattr(owner, name)
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"--{_flag(owner, name)}={v!r} must be a positive number.")


def _flag(owner: object, name: str) -> str:
    prefix = getattr(owner, "_PREFIX", "")
    return f"{prefix}{name}".replace("_", "-")


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    """The adapters: a jlora.LoraConfig (PEFT's adapter_config names in brackets)."""

    _PREFIX = "lora."

    rank: int = 8
    """Adapter rank [r]."""
    alpha: float = 16.0
    """[lora_alpha]: the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)."""
    targets: tuple[str, ...] = (ALL_LINEAR,)
    """Module names matched exactly or as a '.'-suffix of the module path [target_modules];
    'all-linear' alone: every linear layer but the output head."""
    target_regex: str | None = None
    """A regex matched with re.fullmatch on module paths, instead of --lora.targets."""
    exclude: tuple[str, ...] = ()
    """Module names never adapted [exclude_modules]."""
    layers: tuple[int, ...] = ()
    """Adapt only these layer indices [layers_to_transform]."""
    layers_pattern: str | None = None
    """The path segment before the layer index [layers_pattern]."""
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """Per-module ranks: regex -> rank [rank_pattern]."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-module alphas: regex -> alpha [alpha_pattern]."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(rank) [use_rslora]."""
    init: str = "default"
    """Adapter init: default, gaussian, pissa, pissa_niter_N, olora [init_lora_weights]."""
    dropout: float = 0.05
    """Dropout on the adapter input while training [lora_dropout]."""

    def to_config(self) -> LoraConfig:
        """The :class:`jlora.LoraConfig` these flags describe."""
        if self.target_regex is not None and self.targets not in ((), (ALL_LINEAR,)):
            raise ConfigError("give --lora.targets or --lora.target-regex, not both.")
        if self.target_regex is not None:
            targets: str | tuple[str, ...] = self.target_regex
        elif self.targets == (ALL_LINEAR,):
            targets = ALL_LINEAR
        elif ALL_LINEAR in self.targets:
            raise ConfigError("--lora.targets all-linear stands alone: drop the other names.")
        else:
            targets = self.targets
        if not targets:
            raise ConfigError("--lora.targets is empty: name modules (q_proj v_proj), or "
                              "'all-linear', or give --lora.target-regex.")
        return LoraConfig(
            rank=self.rank, alpha=self.alpha, targets=targets, exclude=self.exclude or None,
            layers=self.layers or None, layers_pattern=self.layers_pattern,
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern),
            dropout=self.dropout, init=self.init, use_rslora=self.rslora)


@dataclasses.dataclass(frozen=True)
class OptimArgs:
    """The optimizer (AdamW through optax, on the adapters only) and its schedule."""

    _PREFIX = "optim."

    lr: float = 2e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warm-up: cosine or linear to 0, or constant."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    b1: float = 0.9
    """AdamW beta1."""
    b2: float = 0.999
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_norm: float | None = 1.0
    """Clip gradients to this global norm (None: no clipping)."""
    lora_plus_ratio: float | None = None
    """LoRA+: B learns this many times faster than A (the paper uses 16)."""

    def __post_init__(self):
        _positive(self, "lr", "b2", "eps")
        _positive(self, "clip_norm", "lora_plus_ratio", allow_none=True)
        if self.warmup_steps < 0 or self.weight_decay < 0 or not 0 <= self.b1 < 1 \
                or not 0 < self.b2 < 1:
            raise ConfigError("--optim.warmup-steps and --optim.weight-decay must be >= 0, "
                              "--optim.b1 and --optim.b2 in [0, 1).")


@dataclasses.dataclass(frozen=True)
class DataArgs:
    """The data: text, JSONL or (for embedding) JSONL pairs, tokenized with the model's
    tokenizer."""

    _PREFIX = "data."

    train: tuple[str, ...] = ()
    """Training files: .txt (each file one document) or .jsonl (one record per line)."""
    eval: tuple[str, ...] = ()
    """Held-out files, same format (none: no evaluation)."""
    max_length: int = 256
    """Tokens per sequence (longer texts are cut)."""
    text_field: str = "text"
    """causal-lm: the JSONL field holding the text."""
    prompt_field: str | None = None
    """causal-lm: a JSONL field whose text is context only (no loss on it); the loss then
    covers --data.completion-field."""
    completion_field: str = "completion"
    """causal-lm with --data.prompt-field: the field the loss is computed on."""
    packing: bool = True
    """causal-lm: pack documents (EOS between them) into full-length sequences; otherwise
    one padded sequence per document."""
    query_field: str = "query"
    """embedding: the JSONL field of the query (anchor) text."""
    document_field: str = "document"
    """embedding: the JSONL field of the matching document (positive) text."""

    def __post_init__(self):
        _positive(self, "max_length")


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """The training loop: batch, length, evaluation, checkpoints, devices."""

    _PREFIX = "train."

    batch_size: int = 8
    """Examples per optimizer update (over all devices and micro-batches)."""
    accum_steps: int = 1
    """Micro-batches per update (gradient accumulation); must divide --train.batch-size."""
    steps: int | None = None
    """Updates to run (default: --train.epochs over the training data)."""
    epochs: float = 1.0
    """Passes over the training data, when --train.steps is not given."""
    eval_every: int = 0
    """Evaluate on --data.eval every N updates (0: only at the end)."""
    eval_batch_size: int = 32
    """Examples per evaluation batch."""
    early_stopping: int | None = None
    """Stop after this many evaluations without improvement (None: never)."""
    temperature: float = 0.05
    """embedding: softmax temperature of the in-batch contrastive loss."""
    save_every: int = 100
    """Checkpoint every N updates (and at the end)."""
    keep: int = 2
    """Checkpoints to keep."""
    log_every: int = 1
    """Write a metrics line every N updates."""
    seed: int = 0
    """Seed of the adapter init, the data order and dropout."""
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    """Device mesh axes, e.g. data 2 fsdp 2 tensor 2 (default: every device on 'data')."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 (frozen weights and compute in bfloat16; adapters and optimizer fp32)."""

    def __post_init__(self):
        _positive(self, "batch_size", "accum_steps", "epochs", "eval_batch_size",
                  "save_every", "keep", "log_every", "temperature")
        _positive(self, "steps", "early_stopping", allow_none=True)
        if self.eval_every < 0:
            raise ConfigError(f"--train.eval-every={self.eval_every} must be >= 0.")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"--train.batch-size={self.batch_size} does not divide into "
                              f"--train.accum-steps={self.accum_steps} micro-batches.")


@dataclasses.dataclass(frozen=True)
class Finetune:
    """Fine-tune LoRA adapters on a Hugging Face model directory; write checkpoints,
    metrics, curves and a PEFT adapter."""

    model: str
    """The base model: a transformers directory (config.json, safetensors, tokenizer)."""
    out: str
    """The run directory: config.yaml, checkpoints/, metrics.jsonl, curves.png, adapter/."""
    task: Task = "causal-lm"
    """causal-lm (next-token loss) or embedding (in-batch contrastive on pairs)."""
    data: DataArgs = DataArgs()
    lora: LoraArgs = LoraArgs()
    optim: OptimArgs = OptimArgs()
    train: TrainArgs = TrainArgs()
    resume: bool = False
    """Continue the run in --out from its latest checkpoint."""
    merged: bool = False
    """Also write the merged model (a transformers directory) to <out>/merged."""
    full: bool = False
    """Full fine-tuning, the baseline of LoRA: train every weight (no adapters; the --lora
    options are unused) and export the model to <out>/model instead of an adapter."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Show which modules a LoRA config adapts (shapes from the checkpoint's headers; no
    weights are read)."""

    model: str
    """A transformers model directory."""
    lora: LoraArgs = LoraArgs()


@dataclasses.dataclass(frozen=True)
class Export:
    """Export a finetune run's checkpoint as a PEFT adapter and/or a merged model."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """The run directory of `jlora finetune` (it holds config.yaml and checkpoints/)."""
    adapter: str | None = None
    """Write the PEFT adapter here."""
    merged: str | None = None
    """Write the merged transformers model here."""
    step: int | None = None
    """The checkpoint step (default: the latest)."""
    overwrite: bool = False
    """Replace jlora's files in an existing output directory."""


@dataclasses.dataclass(frozen=True)
class Merge:
    """Fold a PEFT adapter into its base model and write a transformers directory."""

    model: str
    """The base model directory."""
    adapter: str
    """The PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    out: str
    """The merged model directory to write."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Cast the weights (default: as stored)."""
    overwrite: bool = False
    """Replace jlora's files in an existing output directory."""


@dataclasses.dataclass(frozen=True)
class Generate:
    """Generate text with a decoder model and an optional PEFT adapter."""

    model: str
    """The base model directory (llama, mistral, qwen2, gpt2)."""
    prompt: tuple[str, ...] = ()
    """Prompts (each one a row)."""
    prompts_file: str | None = None
    """A text file with one prompt per line (in addition to --prompt)."""
    adapter: str | None = None
    """A PEFT adapter directory to apply."""
    max_new_tokens: int = 64
    """Tokens to generate per prompt."""
    temperature: float = 0.0
    """0: greedy; otherwise sample at this temperature."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    top_k: int | None = None
    """Sample among the k most likely tokens."""
    seed: int = 0
    """Seed for sampling."""

    def __post_init__(self):
        _positive(self, "max_new_tokens")
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1):
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1].")


@dataclasses.dataclass(frozen=True)
class Embed:
    """Embed sentences with an encoder (mean pooling, unit norm) and an optional adapter."""

    model: str
    """The base model directory (bert)."""
    input: str
    """Sentences: a .txt file (one per line) or .jsonl (--field of each record)."""
    out: str
    """The .npy file to write: float32 (sentences, hidden)."""
    adapter: str | None = None
    """A PEFT adapter directory to apply."""
    field: str = "text"
    """The JSONL field to embed."""
    max_length: int = 256
    """Tokens per sentence (longer ones are cut)."""
    batch_size: int = 64
    """Sentences per batch."""

    def __post_init__(self):
        _positive(self, "max_length", "batch_size")


@dataclasses.dataclass(frozen=True)
class Info:
    """Describe a directory: a finetune run, a PEFT adapter or a transformers model."""

    path: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="PATH")]
    """The directory."""


COMMANDS = {
    "finetune": Finetune,
    "plan": Plan,
    "export": Export,
    "merge": Merge,
    "generate": Generate,
    "embed": Embed,
    "info": Info,
}
