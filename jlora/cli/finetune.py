"""``jlora finetune``: the whole job on :mod:`jlora.train`, :mod:`jlora.checkpoint` and
:mod:`jlora.hf` — no second training loop.

A run directory holds ``config.yaml`` (the full :class:`~jlora.cli.args.Finetune`),
``checkpoints/`` (orbax, adapters and optimizer state only), ``metrics.jsonl`` (one line per
logged step or evaluation), ``curves.png`` and, at the end, ``adapter/`` (PEFT; with
held-out data, the adapter of the best evaluation) and optionally ``merged/``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jlora import checkpoint as C
from jlora import hf, train
from jlora.cli import data as D
from jlora.cli import tasks as T
from jlora.cli.args import Finetune
from jlora.cli.runfiles import (
    CONFIG_FILE,
    append_metrics,
    check_resumable,
    load_run_config,
    plot_curves,
    read_metrics,
    write_run_config,
    write_summary,
)
from jlora.config import LoraConfig
from jlora.errors import ConfigError
from jlora.hf.load import read_config
from jlora.inject import inject
from jlora.merge import merge
from jlora.models import arch_spec
from jlora.optim import combine, optimizer, summary
from jlora.train.mesh import AXES, batch_axes

MAX_BAD_STEPS = 20


def schedule_fn(optim: Any, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule: linear warm-up, then cosine / linear decay to 0 or
    constant, over ``total_steps`` updates."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    decay = {
        "cosine": optax.cosine_decay_schedule(optim.lr, decay_steps),
        "linear": optax.linear_schedule(optim.lr, 0.0, decay_steps),
        "constant": optax.constant_schedule(optim.lr),
    }[optim.schedule]
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def make_optimizer(optim: Any, schedule: optax.Schedule, params: Any, full: bool = False):
    """AdamW on the adapters (LoRA+ when asked), or on every weight (``full``), after
    global-norm clipping."""
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay)
    if full and optim.lora_plus_ratio is not None:
        raise ConfigError("--optim.lora-plus-ratio is for LoRA runs; drop it with --full.")
    tx = adamw if full else optimizer(adamw, params, lora_plus_ratio=optim.lora_plus_ratio)
    if optim.clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
    return tx


def make_mesh(axes: dict[str, int]):
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise ConfigError(f"--train.mesh names axes {unknown}; jlora's axes are {list(AXES)} "
                          "(e.g. --train.mesh data 2 fsdp 2 tensor 2).")
    shape = {a: axes.get(a, 1) for a in AXES}
    if not axes:
        shape["data"] = -1
    return train.make_mesh(shape)


def check_task(task: str, model_type: str) -> Any:
    """The architecture spec, checked to fit the task."""
    spec = arch_spec(model_type)
    want = {"causal-lm": "AutoModelForCausalLM", "embedding": "AutoModel"}[task]
    if spec.auto_class != want:
        kind = "a decoder" if spec.auto_class == "AutoModelForCausalLM" else "an encoder"
        other = "embedding" if task == "causal-lm" else "causal-lm"
        raise ConfigError(f"model_type {model_type!r} is {kind}: --task {task} needs "
                          f"{'a decoder (llama, mistral, qwen2, gpt2)' if task == 'causal-lm' else 'an encoder (bert)'}; "  # noqa: E501
                          f"use --task {other} or another --model.")
    return spec


@dataclasses.dataclass
class Session:
    """Everything a run needs in memory: model, adapters, optimizer, mesh, step."""

    cfg: Finetune
    model: Any
    hf_config: dict
    lora_config: LoraConfig
    params: Any
    tx: Any
    schedule: Any
    state: Any
    frozen: Any
    shardings: Any
    precision: train.Precision

    def adapted(self, trainable: Any = None) -> Any:
        """The adapted tree (``trainable`` default: the state's adapters)."""
        return combine(self.state.params if trainable is None else trainable, self.frozen)

    def train_step(self) -> train.TrainStep:
        """The run's compiled train step: the task's loss over the adapted model."""
        loss_fn = T.make_loss(self.cfg.task, self.model, dropout=self.lora_config.dropout,
                              temperature=self.cfg.train.temperature)
        return train.make_train_step(loss_fn, self.tx, self.shardings,
                                     accum_steps=self.cfg.train.accum_steps,
                                     precision=self.precision, schedule=self.schedule,
                                     max_bad_steps=MAX_BAD_STEPS)


def build_session(cfg: Finetune, total_steps: int, mesh: Any = None) -> Session:
    """Loads the base model, injects adapters and lays the run out over the mesh."""
    precision = train.Precision.bf16() if cfg.train.precision == "bf16" else train.Precision()
    lora_config = cfg.lora.to_config()
    mesh = make_mesh(dict(cfg.train.mesh)) if mesh is None else mesh
    model, params, hf_config = hf.load(cfg.model, dtype=precision.frozen_dtype
                                       if cfg.train.precision == "bf16" else None)
    if not cfg.full:
        params = inject(params, lora_config, jax.random.key(cfg.train.seed))
    schedule = schedule_fn(cfg.optim, total_steps)
    tx = make_optimizer(cfg.optim, schedule, params, full=cfg.full)
    state, frozen, sh = train.init(params, tx, jax.random.key(cfg.train.seed + 1), mesh=mesh,
                                   precision=precision, train="all" if cfg.full else "adapters")
    return Session(cfg, model, hf_config, lora_config, params, tx, schedule, state, frozen, sh,
                   precision)


def _host(tree: Any) -> Any:
    """A host copy of a (small) tree of arrays: the adapters of the best evaluation."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def finetune(cfg: Finetune, *, progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs ``jlora finetune``; returns a summary dict (also printed)."""
    out = Path(cfg.out)
    # cheap checks first: the run directory, the model's config and tokenizer, the data
    saved = check_resumable(out, cfg)
    hf_config = read_config(cfg.model)
    check_task(cfg.task, hf_config["model_type"])
    train_arrays, eval_arrays = _data(cfg, D.load_tokenizer(cfg.model))
    per_epoch = D.rows(train_arrays) // cfg.train.batch_size
    source = D.batch_source(train_arrays, cfg.train.batch_size, cfg.train.seed)
    total = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    lora_config = cfg.lora.to_config()
    log(f"data: {D.rows(train_arrays)} training {'sequences' if cfg.task == 'causal-lm' else 'pairs'}"  # noqa: E501
        + (f", {D.rows(eval_arrays)} held out" if eval_arrays else "")
        + f"; {total} steps of {cfg.train.batch_size} ({per_epoch} per epoch)")

    mesh = make_mesh(dict(cfg.train.mesh))
    _check_batch(cfg, mesh)
    s = build_session(cfg, total, mesh)
    log(f"full fine-tuning: {sum(x.size for x in jax.tree.leaves(s.state.params)):,} trainable "
        "params" if cfg.full else str(summary(s.params)))
    step = s.train_step()
    evaluate = (T.make_evaluate(cfg.task, s.model, eval_arrays, cfg.train.eval_batch_size,
                                s.shardings.batch) if eval_arrays is not None else None)
    metric, higher = T.TARGET_METRIC[cfg.task]
    writer = jax.process_index() == 0
    ckpt = C.Checkpointer(out / "checkpoints", lora_config, keep=cfg.train.keep,
                          save_interval_steps=cfg.train.save_every,
                          model_id=str(Path(cfg.model).resolve()))
    try:
        position, history = 0, []
        if saved is not None:
            s.state, position = ckpt.restore(train.abstract(s.state, s.shardings))
            history = read_metrics(out, upto=position)
            log(f"resumed {out} at step {position}")
        elif writer:
            write_run_config(out, cfg)
        if writer:
            append_metrics(out, history, rewrite=True)
        evals = [h for h in history if metric in h]
        best = max(evals, key=lambda h: h[metric] if higher else -h[metric]) if evals else None
        stale = _stale(evals, best)
        first_eval = None
        if evaluate is not None and not evals:
            first_eval = {"step": 0, **evaluate(s.state.params, s.frozen)}
            evals.append(first_eval)
            best = first_eval
            _record(out, history, first_eval, writer)
            log(_fmt_eval("before training", first_eval))
            if writer:
                _save_adapter(s, s.state.params, out)
        result = _loop(cfg, s, step, source, position, total, ckpt, evaluate, history, evals,
                       best, stale, out, writer, progress, log)
    finally:
        ckpt.close()
    adapter_dir = out / ("model" if cfg.full else "adapter")
    if evaluate is None and writer:
        _save_adapter(s, s.state.params, out)
    best = result.get("best")
    if cfg.merged and writer and not cfg.full:
        hf.save_merged(s.model, merge(_final_tree(s, evaluate, result), unload=True),
                       s.hf_config, out / "merged")
        D.copy_tokenizer(cfg.model, out / "merged")
    if writer:
        plot_curves(out, read_metrics(out), cfg.task)
    summary_line = f"loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} in " \
                   f"{result['train_seconds']:.1f}s of training"
    if first_eval is not None or evals:
        start = evals[0]
        if best is not None:
            summary_line += "; " + _fmt_change(start, best, cfg.task)
    log(summary_line)
    log(f"wrote {adapter_dir}" + (f", {out / 'merged'}" if cfg.merged and not cfg.full else "")
        + f", {out / 'metrics.jsonl'} and {out / 'curves.png'}")
    result.pop("best_params", None)
    result = {**result, "evals": evals, "adapter": str(adapter_dir)}
    if writer:
        write_summary(out, result)
    return result


def _save_adapter(s: Session, trainable: Any, out: Path) -> None:
    """The run's export: the PEFT adapter, or with ``--full`` the whole model."""
    if s.cfg.full:
        hf.save_merged(s.model, s.adapted(trainable), s.hf_config, out / "model")
        D.copy_tokenizer(s.cfg.model, out / "model")
        return
    hf.save_peft(s.adapted(trainable), s.lora_config, out / "adapter", hf_config=s.hf_config,
                 base_model_name_or_path=str(Path(s.cfg.model).resolve()))


def _final_tree(s: Session, evaluate: Any, result: dict) -> Any:
    """The adapted tree that was exported: the best evaluation's, else the last state's."""
    if evaluate is None:
        return s.adapted()
    if result.get("best_params") is not None:
        return s.adapted(result["best_params"])
    # the best evaluation ran before a resume: read its adapter back onto the base
    _, base, hf_config = hf.load(s.cfg.model, dtype=s.precision.frozen_dtype
                                 if s.cfg.train.precision == "bf16" else None)
    return hf.load_peft(base, Path(s.cfg.out) / "adapter", hf_config=hf_config)[0]


def _data(cfg: Finetune, tokenizer: Any) -> tuple[D.Arrays, D.Arrays | None]:
    """The tokenized training and held-out arrays (held-out: None without --data.eval)."""
    fields = _fields(cfg)
    train_arrays = _arrays(cfg, D.read_texts(cfg.data.train, fields, "train"), tokenizer)
    if not cfg.data.eval:
        return train_arrays, None
    return train_arrays, _arrays(cfg, D.read_texts(cfg.data.eval, fields, "eval"), tokenizer)


def _check_batch(cfg: Finetune, mesh: Any) -> None:
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh)) * cfg.train.accum_steps
    if cfg.train.batch_size % shards:
        raise ConfigError(f"--train.batch-size={cfg.train.batch_size} does not divide into "
                          f"{shards // cfg.train.accum_steps} data-parallel shards x "
                          f"{cfg.train.accum_steps} micro-batches: use a multiple of {shards}.")


def _fields(cfg: Finetune) -> list[str]:
    if cfg.task == "embedding":
        return [cfg.data.query_field, cfg.data.document_field]
    if cfg.data.prompt_field is not None:
        return [cfg.data.prompt_field, cfg.data.completion_field]
    return [cfg.data.text_field]


def _arrays(cfg: Finetune, docs: list[dict[str, str]], tokenizer: Any) -> D.Arrays:
    if cfg.task == "embedding":
        return D.pair_arrays(docs, tokenizer, max_length=cfg.data.max_length,
                             query_field=cfg.data.query_field,
                             document_field=cfg.data.document_field)
    return D.causal_lm_arrays(docs, tokenizer, max_length=cfg.data.max_length,
                              packing=cfg.data.packing, text_field=cfg.data.text_field,
                              prompt_field=cfg.data.prompt_field,
                              completion_field=cfg.data.completion_field)


def _stale(evals: list[dict], best: dict | None) -> int:
    """Evaluations since the best one."""
    if best is None:
        return 0
    return len(evals) - 1 - evals.index(best)


def _record(out: Path, history: list[dict], entry: dict, writer: bool) -> None:
    history.append(entry)
    if writer:
        append_metrics(out, [entry])


def _fmt_eval(when: str, e: dict) -> str:
    items = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in e.items() if k != "step")
    return f"held-out {when}: {items}"


def _fmt_change(a: dict, b: dict, task: str) -> str:
    keys = ("eval_recall@1", "eval_mrr") if task == "embedding" else ("eval_loss",
                                                                      "eval_perplexity")
    return "; ".join(f"{k.removeprefix('eval_')} {a[k]:.3f} -> {b[k]:.3f}" for k in keys) + \
        f" (best at step {b['step']})"


def _loop(cfg, s, step, source, position, total, ckpt, evaluate, history, evals, best, stale,
          out, writer, progress, log) -> dict[str, Any]:
    from tqdm.auto import tqdm

    metric, higher = T.TARGET_METRIC[cfg.task]
    it = train.DataIterator(source, position)
    multiple = cfg.train.accum_steps
    best_params = None
    losses: list[float] = [h["loss"] for h in history if "loss" in h]
    bar = tqdm(total=total, initial=position, disable=not progress or not writer,
               desc="finetune", mininterval=1.0, dynamic_ncols=True)
    pending: list[tuple[int, Any, int, float]] = []
    t_start = time.perf_counter()
    window_tokens, window_t = 0, time.perf_counter()
    stopped = "done"
    eval_seconds = 0.0
    saved_at = position

    def drain(keep: int = 0):
        nonlocal window_tokens, window_t
        while len(pending) > keep:
            i, m, tokens, t = pending.pop(0)
            loss = float(m["loss"])
            losses.append(loss)
            window_tokens += tokens
            now = time.perf_counter()
            rate = window_tokens / max(now - window_t, 1e-9)
            if i % cfg.train.log_every == 0 or i == total:
                entry = {"step": i, "loss": loss, "grad_norm": float(m["grad_norm"]),
                         "learning_rate": float(m["learning_rate"]),
                         "tokens_per_s": rate, "elapsed_s": now - t_start}
                _record(out, history, entry, writer)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if now - window_t > 10.0:
                window_tokens, window_t = 0, now

    while it.position < total:
        batch = next(it)
        i = it.position
        tokens = D.real_tokens(batch)
        s.state, m = step(s.state, s.frozen, train.shard_batch(batch, s.shardings.batch,
                                                                multiple=multiple))
        pending.append((i, m, tokens, time.perf_counter()))
        drain(keep=1)  # read the previous step's metrics while this one runs
        if i % cfg.train.save_every == 0 or i == total:
            ckpt.save(i, s.state, data_position=it.position, force=True)
            saved_at = i
        due = evaluate is not None and (i == total or (cfg.train.eval_every
                                                       and i % cfg.train.eval_every == 0))
        if due:
            drain()
            t_eval = time.perf_counter()
            e = {"step": i, **evaluate(s.state.params, s.frozen)}
            eval_seconds += time.perf_counter() - t_eval
            evals.append(e)
            _record(out, history, e, writer)
            bar.write(_fmt_eval(f"at step {i}", e))
            better = best is None or (e[metric] > best[metric] if higher
                                      else e[metric] < best[metric])
            if better:
                best, stale = e, 0
                best_params = _host(s.state.params)
                if writer:
                    _save_adapter(s, best_params, out)
            else:
                stale += 1
                if cfg.train.early_stopping and stale >= cfg.train.early_stopping:
                    if saved_at != i:
                        ckpt.save(i, s.state, data_position=it.position, force=True)
                    stopped = f"early stopping at step {i}"
                    bar.write(f"no improvement of {metric} in {stale} evaluations: stopping")
                    break
    drain()
    bar.close()
    ckpt.wait()
    first = losses[0] if losses else float("nan")
    last = float(np.mean(losses[-max(1, min(5, len(losses))):])) if losses else float("nan")
    return {"steps": it.position, "stopped": stopped, "loss_first": first, "loss_last": last,
            "losses": losses, "train_seconds": time.perf_counter() - t_start - eval_seconds,
            "eval_seconds": eval_seconds, "best": best,
            "best_params": best_params}


def run(cfg: Finetune) -> int:
    finetune(cfg)
    return 0


__all__ = ["CONFIG_FILE", "build_session", "finetune", "load_run_config", "run",
           "schedule_fn"]
