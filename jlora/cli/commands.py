"""The ``jlora`` subcommands besides ``finetune``: plan, export, merge, generate, embed, info.

Each takes its typed config (:mod:`jlora.cli.args`), calls the library (``jlora.hf``,
``jlora.checkpoint``, ``jlora.models``) and prints what it did; user mistakes raise
:class:`~jlora.errors.JloraError`, which :func:`jlora.cli.main` prints as one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import unflatten_dict

from jlora import checkpoint as C
from jlora import hf
from jlora.cli import args as A
from jlora.cli import data as D
from jlora.cli.finetune import build_session, check_task
from jlora.cli.runfiles import CHECKPOINTS, CONFIG_FILE, has_checkpoint, load_run_config
from jlora.cli.tasks import embed_fn
from jlora.errors import ConfigError, DataError, HFError
from jlora.forward import lora
from jlora.hf.io import checkpoint_index, hf_layout_shape, read_header
from jlora.hf.load import read_config
from jlora.hf.peft_layout import CONFIG_FILE as ADAPTER_CONFIG
from jlora.hf.peft_layout import WEIGHTS_FILE as ADAPTER_WEIGHTS
from jlora.inject import plan as make_plan
from jlora.merge import merge
from jlora.models import arch_spec
from jlora.models.generate import generate
from jlora.optim import combine
from jlora.train import abstract


def header_params(model_dir: str) -> tuple[dict, dict]:
    """``({'params': tree of ShapeDtypeStruct}, hf_config)`` from the safetensors headers."""
    hf_config = read_config(model_dir)
    spec = arch_spec(hf_config["model_type"])
    flat = {}
    for name, info in checkpoint_index(model_dir).items():
        converted = hf_layout_shape(spec.hf_to_params, name, shape=info.shape, dtype=info.dtype)
        if converted is not None:
            path, array = converted
            flat[path] = jax.ShapeDtypeStruct(array.shape, array.dtype)
    return {"params": unflatten_dict(flat)}, hf_config


def plan(cfg: A.Plan) -> int:
    tree, hf_config = header_params(cfg.model)
    print(f"{cfg.model}: {hf_config['model_type']}")
    print(make_plan(tree, cfg.lora.to_config()))
    return 0


def export(cfg: A.Export) -> int:
    if cfg.adapter is None and cfg.merged is None:
        raise ConfigError("jlora export: give --adapter DIR and/or --merged DIR to write.")
    run = Path(cfg.run)
    if not has_checkpoint(run):
        raise ConfigError(f"{cfg.run!r} holds no checkpoint ({CHECKPOINTS}/<step>); give the "
                          "run directory of `jlora finetune`.")
    run_cfg = load_run_config(run)
    if run_cfg.full and cfg.adapter is not None:
        raise ConfigError(f"{cfg.run!r} is a full fine-tuning run: it has no adapter to export; "
                          "use --merged DIR.")
    s = build_session(run_cfg, total_steps=1)
    with C.Checkpointer(run / CHECKPOINTS, s.lora_config, keep=None,
                        model_id=str(Path(run_cfg.model).resolve())) as ckpt:
        state, _ = ckpt.restore(abstract(s.state, s.shardings), step=cfg.step)
        step = cfg.step if cfg.step is not None else ckpt.latest_step()
    adapted = combine(state.params, s.frozen)
    if cfg.adapter is not None:
        hf.save_peft(adapted, s.lora_config, cfg.adapter, hf_config=s.hf_config,
                     base_model_name_or_path=str(Path(run_cfg.model).resolve()),
                     **_overwrite(cfg))
        print(f"wrote the PEFT adapter of step {step} to {cfg.adapter}")
    if cfg.merged is not None:
        hf.save_merged(s.model, merge(adapted, unload=True), s.hf_config, cfg.merged,
                       **_overwrite(cfg))
        D.copy_tokenizer(run_cfg.model, cfg.merged)
        print(f"wrote the merged model of step {step} to {cfg.merged}")
    return 0


def _overwrite(cfg: Any) -> dict[str, Any]:
    """``overwrite=True`` for the savers when asked (older savers lack the argument)."""
    return {"overwrite": True} if getattr(cfg, "overwrite", False) else {}


def _with_adapter(model_dir: str, adapter: str | None) -> tuple[Any, Any, dict]:
    model, params, hf_config = hf.load(model_dir)
    if adapter is not None:
        params, _ = hf.load_peft(params, adapter, hf_config=hf_config)
    return model, params, hf_config


def merge_cmd(cfg: A.Merge) -> int:
    model, params, hf_config = _with_adapter(cfg.model, cfg.adapter)
    dtype = None if cfg.dtype is None else np.dtype(cfg.dtype) if cfg.dtype != "bfloat16" \
        else jax.numpy.bfloat16
    hf.save_merged(model, merge(params, unload=True), hf_config, cfg.out, dtype=dtype,
                   **_overwrite(cfg))
    D.copy_tokenizer(cfg.model, cfg.out)
    print(f"wrote {cfg.model} with {cfg.adapter} merged in to {cfg.out}")
    return 0


def generate_cmd(cfg: A.Generate) -> int:
    check_task("causal-lm", read_config(cfg.model)["model_type"])
    tokenizer = D.load_tokenizer(cfg.model)
    prompts = list(cfg.prompt)
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise DataError(f"--prompts-file {cfg.prompts_file!r} does not exist.")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise DataError("no prompt: give --prompt TEXT [TEXT ...] or --prompts-file FILE.")
    model, params, _ = _with_adapter(cfg.model, cfg.adapter)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        tokenizer.pad_token_id = pad
    enc = tokenizer(prompts, padding=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    sample = cfg.temperature > 0
    out = generate(lora(model.apply), params, ids, enc["attention_mask"].astype(np.int32),
                   init_cache=model.init_cache, max_new_tokens=cfg.max_new_tokens,
                   do_sample=sample, rng=jax.random.key(cfg.seed) if sample else None,
                   temperature=cfg.temperature if sample else 1.0, top_k=cfg.top_k,
                   top_p=cfg.top_p, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
    texts = tokenizer.batch_decode(np.asarray(out)[:, ids.shape[1]:], skip_special_tokens=True)
    for prompt, text in zip(prompts, texts):
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False))
    return 0


def embed_cmd(cfg: A.Embed) -> int:
    check_task("embedding", read_config(cfg.model)["model_type"])
    tokenizer = D.load_tokenizer(cfg.model)
    out = Path(cfg.out)
    if out.suffix != ".npy":
        raise ConfigError(f"--out {cfg.out!r}: embeddings are written as a .npy file.")
    if Path(cfg.input).suffix == ".jsonl":
        texts = [r[cfg.field] for r in D.read_texts([cfg.input], [cfg.field], "input")]
    else:
        if not Path(cfg.input).is_file():
            raise DataError(f"--input {cfg.input!r} does not exist.")
        texts = [line for line in Path(cfg.input).read_text().splitlines() if line.strip()]
        if not texts:
            raise DataError(f"--input {cfg.input!r} is empty.")
    model, params, _ = _with_adapter(cfg.model, cfg.adapter)
    embed = jax.jit(embed_fn(model))
    chunks = []
    arrays = D.encode(tokenizer, texts, cfg.max_length)
    for batch, real in D.eval_batches(arrays, cfg.batch_size):
        e = embed(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        chunks.append(np.asarray(e, np.float32)[:real])
    emb = np.concatenate(chunks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, emb)
    os.replace(tmp, out)
    print(f"wrote {emb.shape[0]} embeddings of size {emb.shape[1]} to {cfg.out}")
    return 0


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def info(cfg: A.Info) -> int:
    path = Path(cfg.path)
    if not path.is_dir():
        raise ConfigError(f"{cfg.path!r} is not a directory; give a finetune run, a PEFT "
                          "adapter or a transformers model directory.")
    lines: list[str]
    if (path / CONFIG_FILE).is_file():
        lines = _info_run(path)
    elif (path / ADAPTER_CONFIG).is_file():
        lines = _info_adapter(path)
    elif (path / "config.json").is_file():
        lines = _info_model(path)
    elif has_checkpoint(path.parent) and path.name == CHECKPOINTS:
        lines = _info_run(path.parent)
    else:
        raise ConfigError(f"{cfg.path!r} is neither a finetune run ({CONFIG_FILE}), a PEFT "
                          f"adapter ({ADAPTER_CONFIG}) nor a transformers model (config.json).")
    print("\n".join(lines))
    return 0


def _info_model(path: Path) -> list[str]:
    hf_config = read_config(path)
    index = checkpoint_index(path)
    n = sum(int(np.prod(i.shape)) for i in index.values())
    dtypes = sorted({str(i.dtype) for i in index.values()})
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "n_layer", "n_embd", "n_head")
    shape = ", ".join(f"{k} {hf_config[k]}" for k in keys if k in hf_config)
    tok = any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json"))
    return [f"{path}: transformers model, model_type {hf_config['model_type']!r}",
            f"  {shape}",
            f"  {n:,} parameters in {len(index)} tensors ({', '.join(dtypes)}), "
            f"{_size(path)} on disk; tokenizer: {'yes' if tok else 'no'}"]


def _info_adapter(path: Path) -> list[str]:
    try:
        d = json.loads((path / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{str(path / ADAPTER_CONFIG)!r} is not valid JSON ({e}).") from None
    weights = path / ADAPTER_WEIGHTS
    header = read_header(weights) if weights.is_file() else {}
    n = sum(int(np.prod(i.shape)) for i in header.values())
    modules = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in header})
    lines = [f"{path}: PEFT adapter, peft_type {d.get('peft_type')!r}, task_type "
             f"{d.get('task_type')!r}",
             f"  base model: {d.get('base_model_name_or_path')}",
             f"  r {d.get('r')}, lora_alpha {d.get('lora_alpha')}, use_rslora "
             f"{d.get('use_rslora', False)}, target_modules {d.get('target_modules')}",
             f"  {len(modules)} adapted modules, {n:,} adapter parameters, {_size(path)}"]
    for key in ("rank_pattern", "alpha_pattern"):
        if d.get(key):
            lines.append(f"  {key}: {d[key]}")
    return lines


def _info_run(path: Path) -> list[str]:
    cfg = load_run_config(path)
    lines = [f"{path}: jlora finetune run ({cfg.task}) of {cfg.model}",
             f"  lora: {cfg.lora.to_config()}"]
    if has_checkpoint(path):
        with C.Checkpointer(path / CHECKPOINTS, cfg.lora.to_config(), keep=None) as ckpt:
            steps = ckpt.all_steps()
            meta = ckpt.metadata(steps[-1]) if steps else {}
        shapes = meta.get("adapters", {})
        n = sum(int(np.prod(s)) for s in shapes.values())
        lines.append(f"  checkpoints at steps {steps}; {len(shapes) // 2} adapters, {n:,} "
                     f"adapter parameters; {_size(path / CHECKPOINTS)}")
    from jlora.cli.runfiles import read_metrics

    rows = read_metrics(path)
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    trains = [r for r in rows if "loss" in r]
    if trains:
        lines.append(f"  last logged step {trains[-1]['step']}: loss {trains[-1]['loss']:.4f}")
    if evals:
        e = evals[-1]
        lines.append("  last evaluation (step {}): {}".format(
            e["step"], ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in e.items()
                                 if k != "step")))
    for sub in ("adapter", "merged"):
        if (path / sub).is_dir():
            lines.append(f"  {sub}/: {_size(path / sub)}")
    return lines
