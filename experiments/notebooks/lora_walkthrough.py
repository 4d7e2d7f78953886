# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # LoRA with jlora: load → plan → inject → sharded training → merge → export → peft
#
# This notebook walks through one LoRA fine-tuning run with
# [jlora](../../README.md), end to end:
#
# 1. load a Hugging Face checkpoint into a Flax model (`jlora.hf.load`);
# 2. dry-run the adapter placement (`jlora.plan`) and add the adapters (`jlora.inject`);
# 3. train only the adapters with a jit-compiled step sharded over **every device found**
#    (TPU, GPU, or simulated CPU devices) (`jlora.train`);
# 4. plot the loss curve;
# 5. fold the adapters into the weights (`jlora.merge`) and check nothing changed;
# 6. export a PEFT adapter and a merged transformers model (`jlora.hf.save_peft`,
#    `jlora.hf.save_merged`);
# 7. reload both in PyTorch (`peft.PeftModel.from_pretrained`, `transformers`) and compare
#    logits with jlora's.
#
# By default it builds a tiny random Llama so that it runs in about a minute on a laptop CPU
# (the test suite executes it). Point `MODEL_DIR` below at a real checkpoint to run the same
# steps on it.

# %% [markdown]
# ## Set-up
#
# On a CPU, XLA shows one device unless told otherwise; the flag below makes it simulate 8,
# so the sharded step is exercised for real. It must be set before `jax` is imported and is
# ignored on TPU and GPU.

# %%
import os
import warnings

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# keep the outputs readable: no notices about ipywidgets or transformers deprecations
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
print("XLA_FLAGS =", os.environ["XLA_FLAGS"])

# %%
# ruff: noqa: E402
# (the imports follow the XLA_FLAGS cell on purpose: jax reads the flag once, at import)
import pydoc_data.topics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import transformers

import jlora

# %matplotlib inline
transformers.logging.set_verbosity_error()  # no progress bars or notices from transformers
transformers.logging.disable_progress_bar()
print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} devices")

# %% [markdown]
# ## A base model
#
# `jlora.hf.load` reads any transformers checkpoint directory of a supported architecture
# (Llama, Mistral, Qwen2, GPT-2, BERT; safetensors weights). **`MODEL_DIR`** is the one
# line to change: leave it `None` for a tiny random Llama written here by transformers
# itself (with a small byte-level BPE tokenizer trained on the text we fine-tune on), or
# set it to a local checkpoint directory of a Llama-family causal LM (Llama, Mistral,
# Qwen2), e.g. `"/data/Qwen2.5-0.5B"`; its tokenizer is read from the same directory. (For
# GPT-2, change `TARGETS` below to its module names, e.g. `["c_attn", "c_fc"]`.)

# %%
MODEL_DIR = None  # <- a Hugging Face checkpoint directory, or None for a tiny random Llama

# %%
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORK = Path(tempfile.mkdtemp(prefix="jlora-walkthrough-"))
TOPICS = sorted(pydoc_data.topics.topics)  # the Python reference manual, as English prose
TEXTS = [pydoc_data.topics.topics[k] for k in TOPICS]

if MODEL_DIR is None:
    MODEL_DIR = WORK / "tiny-llama"
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(MODEL_DIR)
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=3)).save_pretrained(MODEL_DIR)

MODEL_DIR = Path(MODEL_DIR)
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
print(sorted(p.name for p in MODEL_DIR.iterdir()))

# %% [markdown]
# ## Load it into Flax
#
# `load` returns the linen module, `{'params': ...}` exactly as `model.init` would, and the
# config.json dict. Module paths equal transformers' module names
# (`model.layers.0.self_attn.q_proj`), so PEFT `target_modules` carry over unchanged
# ([Paths](../../README.md#semantics)).

# %%
model, params, hf_config = jlora.hf.load(MODEL_DIR)
print(type(model).__name__, hf_config["model_type"])
print(jax.tree.map(lambda x: x.shape, params["params"]["model"]["layers"]["0"]["self_attn"]))

# %% [markdown]
# ## Plan, then inject
#
# A `LoraConfig` selects the kernels to adapt with PEFT's exact target rules
# ([Targets](../../README.md#semantics)): a list matches module names or their `.`-suffixes
# (`["q_proj", "v_proj"]`), a string is a regex that must match the whole module path, and
# `"all-linear"` is every linear layer but the output head. Here a regex takes every
# projection and the output head too: a random base's head is too small for the other
# adapters to move the logits far (for a pretrained model, `"all-linear"` is the usual
# choice). `jlora.plan` is a dry run: which kernels, with what shapes, ranks, scales and
# parameter counts. A config that matches nothing is an error that lists the nearest paths.

# %%
TARGETS = r".*\.(q|k|v|o|gate|up|down)_proj|lm_head"  # a string: re.fullmatch, as in PEFT
config = jlora.LoraConfig(rank=8, alpha=16, targets=TARGETS, dropout=0.05)
print(jlora.plan(params, config))

# %% [markdown]
# `jlora.inject` adds `kernel_lora_a` (in, r), `kernel_lora_b` (r, out) and a 0-d
# `kernel_lora_scale` beside each adapted kernel and changes nothing else
# ([Leaves](../../README.md#semantics)). B starts at zero, so the adapted model computes
# exactly what the base model does until the first update.

# %%
params = jlora.inject(params, config, jax.random.key(0))
print(jlora.summary(params))
print(sorted(params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]))

# %% [markdown]
# ## Real text
#
# We fine-tune on the Python reference manual's prose (`pydoc_data.topics`, shipped with
# Python): the topics are split into training and held-out sets, tokenized, and cut into
# windows of `SEQ_LEN` tokens.

# %%
SEQ_LEN = 64
held_out_topics = set(TOPICS[::10])  # every tenth topic is held out
train_text = "\n\n".join(t for k, t in zip(TOPICS, TEXTS) if k not in held_out_topics)
test_text = "\n\n".join(t for k, t in zip(TOPICS, TEXTS) if k in held_out_topics)


def windows(text: str) -> np.ndarray:
    ids = np.asarray(tokenizer(text)["input_ids"], np.int32)
    n = len(ids) // SEQ_LEN
    return ids[: n * SEQ_LEN].reshape(n, SEQ_LEN)


train_ids, test_ids = windows(train_text), windows(test_text)
print(f"train: {train_ids.shape[0]} windows of {SEQ_LEN} tokens, held out: {test_ids.shape[0]}")
print(repr(tokenizer.decode(train_ids[0][:24])))

# %% [markdown]
# ## A mesh of all devices
#
# `jlora.train.make_mesh` lays the devices out on named axes: `data` (batch), `fsdp` (batch
# and the weights' other axis) and `tensor` (Megatron-style column/row-parallel projections).
# Below, the axes are chosen from `jax.device_count()` so that the same cell runs on one CPU,
# 8 simulated devices, a GPU or a TPU slice; for a large model give `fsdp` and `tensor` more
# of the devices. See [Sharded training](../../README.md#sharded-training-and-checkpoints).

# %%
n = jax.device_count()
tensor = 2 if n >= 4 and n % 2 == 0 else 1
fsdp = 2 if (n // tensor) % 2 == 0 else 1
mesh = jlora.train.make_mesh({"data": n // (tensor * fsdp), "fsdp": fsdp, "tensor": tensor})
print(dict(mesh.shape))

# %% [markdown]
# `jlora.train.init` splits the tree into the trainable adapters and the frozen base, lays
# both out over the mesh (frozen params by regex rules, each adapter after the kernel it
# adapts) and builds the `TrainState` (adapters, optimizer state, step, dropout rng).
# `make_train_step` compiles one step that differentiates only the adapters; the frozen half
# is an argument, never differentiated and never donated
# ([Frozen means frozen](../../README.md#semantics)).

# %%
STEPS, LR = 40, 3e-3
data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
BATCH = data_shards * max(1, 16 // data_shards)  # rows per step, a multiple of the data axes
tx = optax.chain(optax.clip_by_global_norm(1.0),
                 optax.adamw(optax.warmup_cosine_decay_schedule(0.0, LR, 5, STEPS)))
state, frozen, sh = jlora.train.init(params, tx, jax.random.key(1), mesh=mesh)
loss_fn = jlora.train.causal_lm_loss(model.apply, dropout=config.dropout)
step = jlora.train.make_train_step(loss_fn, tx, sh)

q = state.params["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
print("q_proj A:", q["kernel_lora_a"].sharding.spec, " B:", q["kernel_lora_b"].sharding.spec)
print("frozen q_proj kernel:",
      frozen["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].sharding.spec)

# %% [markdown]
# The held-out loss uses the same loss function without a dropout rng (so no dropout), on
# the combined tree `jlora.combine(trainable, frozen)`.

# %%
eval_loss = jax.jit(lambda trainable, frozen, batch: loss_fn(
    jlora.combine(trainable, frozen), batch, None)[0])
eval_rows = test_ids[: data_shards * max(1, 32 // data_shards)]
eval_batch = jlora.train.shard_batch({"input_ids": eval_rows}, sh.batch)
before = float(eval_loss(state.params, frozen, eval_batch))
print(f"held-out loss before training: {before:.3f}")

# %% [markdown]
# ## Train
#
# Each batch is placed on the mesh with `shard_batch` (every process passes the same global
# batch and keeps its rows). The step compiles once.

# %%
rng = np.random.default_rng(0)
losses = []
for _ in range(STEPS):
    rows = train_ids[rng.choice(len(train_ids), BATCH, replace=False)]
    state, metrics = step(state, frozen,
                          jlora.train.shard_batch({"input_ids": rows}, sh.batch))
    losses.append(float(metrics["loss"]))
after = float(eval_loss(state.params, frozen, eval_batch))
print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}; held-out {before:.3f} -> {after:.3f}; "
      f"compiled {step.trace_count}x")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(range(1, STEPS + 1), losses, label="train (per step)")
ax.scatter([0, STEPS], [before, after], color="C3", zorder=3, label="held-out")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats/token)")
ax.set_title(f"LoRA r={config.rank} on {hf_config['model_type']}, mesh {dict(mesh.shape)}")
ax.legend()
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## Merge
#
# `jlora.lora(model.apply)` runs the adapters beside the frozen matmuls (`x @ A @ B`, never
# forming ΔW). `jlora.merge(params, unload=True)` folds them into the kernels,
# `W + scale · A @ B`, for zero-overhead inference with plain `model.apply`; the two must
# agree. Comparisons run at full float32 matmul precision (TPUs and GPUs otherwise use
# bf16/tf32 passes).

# %%
ATOL = 1e-4
params = jlora.combine(state.params, frozen)
merged = jlora.merge(params, unload=True)
ids = test_ids[:2, :32]
no_adapters = jlora.combine(jax.tree.map(jnp.zeros_like, state.params), frozen)  # B = 0
with jax.default_matmul_precision("highest"):
    adapted = np.asarray(jax.jit(jlora.lora(model.apply))(params, ids))
    from_merged = np.asarray(jax.jit(model.apply)(merged, ids))
    base = np.asarray(jax.jit(jlora.lora(model.apply))(no_adapters, ids))
diff_merge = np.abs(adapted - from_merged).max()
print(f"max |adapted - merged| = {diff_merge:.2e}   "
      f"(the adapters moved the logits by up to {np.abs(adapted - base).max():.2f})")
assert diff_merge <= ATOL

# %% [markdown]
# ## Export
#
# `save_peft` writes `adapter_config.json` + `adapter_model.safetensors` with PEFT's key
# names, shapes and every config field that changes the math; `save_merged` writes a
# transformers checkpoint of the merged model. Saves never destroy: they refuse the current
# directory and the directory `load` read, so they go to a fresh directory here.

# %%
OUT = Path(tempfile.mkdtemp(prefix="jlora-export-"))
adapter_dir = jlora.hf.save_peft(params, config, OUT / "adapter",
                                 base_model_name_or_path=str(MODEL_DIR), hf_config=hf_config)
merged_dir = jlora.hf.save_merged(model, merged, hf_config, OUT / "merged")
tokenizer.save_pretrained(merged_dir)
for d in (adapter_dir, merged_dir):
    print(d.name, sorted(p.name for p in d.iterdir()))

# %% [markdown]
# ## Reload in PyTorch and compare
#
# `peft.PeftModel.from_pretrained` puts the adapter on the transformers model read from
# `MODEL_DIR`; transformers reads the merged export on its own. Both must give jlora's
# logits (see the end of the [README's quickstart](../../README.md#quickstart)).

# %%
import peft
import torch
from transformers import AutoModelForCausalLM

hf_base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
peft_model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
hf_merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
with torch.no_grad():
    peft_logits = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    merged_logits = hf_merged(input_ids=torch.from_numpy(ids)).logits.numpy()

rows = [("jlora adapted vs jlora merged", diff_merge),
        ("jlora adapted vs peft (adapter export)", np.abs(adapted - peft_logits).max()),
        ("jlora adapted vs transformers (merged export)",
         np.abs(adapted - merged_logits).max()),
        ("for scale: jlora adapted vs base model", np.abs(adapted - base).max())]
print(f"{'logits compared':48s} max |diff|")
for name, d in rows:
    print(f"{name:48s} {d:.2e}")
assert all(d <= ATOL for _, d in rows[:3])

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
pick = np.random.default_rng(0).choice(adapted.size, min(adapted.size, 4000), replace=False)
ax1.scatter(adapted.ravel()[pick], peft_logits.ravel()[pick], s=3, alpha=0.5)
lo, hi = adapted.min(), adapted.max()
ax1.plot([lo, hi], [lo, hi], color="k", lw=0.8)
ax1.set_xlabel("jlora logits")
ax1.set_ylabel("peft logits")
ax1.set_title("each logit: jlora vs peft")
names = ["merged\n(jlora)", "peft\nadapter", "transformers\nmerged", "base\n(for scale)"]
ax2.bar(names, [max(d, 1e-12) for _, d in rows], color=["C0", "C0", "C0", "C7"])
ax2.axhline(ATOL, color="C3", ls="--", label=f"tolerance {ATOL:g}")
ax2.set_yscale("log")
ax2.set_ylabel("max |logit difference|")
ax2.set_title("agreement with jlora's adapted model")
ax2.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Where next
#
# * The same run from the command line, with checkpoints and resumption: `jlora finetune`.
# * Other target sets, rsLoRA, LoRA+, PiSSA/OLoRA initialisation: fields of `LoraConfig`
#   ([Semantics](../../README.md#semantics)).
# * Gradient accumulation, bf16, rematerialisation, orbax checkpoints of the adapters only:
#   options of `jlora.train.make_train_step` and `jlora.checkpoint.Checkpointer`
#   ([Sharded training](../../README.md#sharded-training-and-checkpoints)).
