"""Rank and targets sweep on the code-search task of `make demo` (all-MiniLM-L6-v2).

Zero-shot, full fine-tuning and LoRA (ranks 1-64 on every linear layer; q,v / all attention /
all linear at rank 8; rsLoRA, LoRA+, PiSSA and OLoRA init at rank 8), each with seeds 0, 1, 2
(the seed drives the adapter init, the data order and dropout). Everything else is
:data:`jlora.demo.RECIPE`: the same pairs, split by package, steps, batch, schedule, lr 1e-3,
alpha 16 at every rank. Every run is ``jlora finetune`` (:func:`jlora.cli.finetune.finetune`)
in this process. Per cell: held-out recall@1 and MRR after the last step (mean and sample std
over seeds), trainable parameters, step time (median over steps 3..N of the run's
``metrics.jsonl``: the first, compiling, step and the next are left out) and the compiled
train step's memory (XLA ``memory_analysis``: temporaries + arguments; once per config).

Full fine-tuning's lr is picked once, by a small grid (:data:`FULL_LRS`, seed 0) on a
validation split of the *training* packages (split by package again), never on the held-out
packages; the chosen lr then runs with every seed on the standard split.

  python -m experiments.sweep_minilm                 # ~45 minutes on 2 CPU cores
  python -m experiments.sweep_minilm --only lora-r4 --seed 1   # one cell again; compares
                                                     # with the stored results

Writes ``experiments/results/sweep_minilm.{json,md,png}`` (a full run only; ``--only``
prints its record and whether it equals the stored one).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SEEDS = (0, 1, 2)
RANKS = (1, 2, 4, 8, 16, 64)
FULL_LRS = (1e-5, 3e-5, 1e-4, 3e-4)
TARGETS = {
    "q,v": ("query", "value"),
    "all attention": ("query", "key", "value", "attention.output.dense"),
    "all linear": ("query", "key", "value", "dense"),  # RECIPE's: every dense of the encoder
}
VARIANTS = {
    "LoRA": (),
    "rsLoRA": ("--lora.rslora",),
    "LoRA+": ("--optim.lora-plus-ratio", "16"),
    "PiSSA": ("--lora.init", "pissa"),
    "OLoRA": ("--lora.init", "olora"),
}
SKIP_STEPS = 2  # steps left out of the step-time median (the first one compiles)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of the sweep."""

    name: str
    kind: str  # "zero-shot", "full" or "lora"
    rank: int | None = None
    targets: str | None = None
    variant: str | None = None

    @property
    def label(self) -> str:
        if self.kind != "lora":
            return {"zero-shot": "zero-shot", "full": "full fine-tuning"}[self.kind]
        return f"{self.variant} r={self.rank}, {self.targets}"

    def flags(self, full_lr: float | None = None) -> list[str]:
        """The flags this cell adds to (or changes in) the recipe's command line."""
        if self.kind == "full":
            return ["--full", "--optim.lr", repr(full_lr)]
        if self.kind == "zero-shot":
            return []
        return ["--lora.rank", str(self.rank), "--lora.targets", *TARGETS[self.targets],
                *VARIANTS[self.variant]]


def cells() -> list[Cell]:
    """The sweep's cells, in the order they run."""
    out = [Cell("zero-shot", "zero-shot"), Cell("full", "full")]
    out += [Cell(f"lora-r{r}", "lora", r, "all linear", "LoRA") for r in RANKS]
    out += [Cell("lora-r8-qv", "lora", 8, "q,v", "LoRA"),
            Cell("lora-r8-attn", "lora", 8, "all attention", "LoRA")]
    out += [Cell(f"lora-r8-{v.lower().replace('+', 'plus')}", "lora", 8, "all linear", v)
            for v in VARIANTS if v != "LoRA"]
    return out


# --------------------------------------------------------------------------- one run
def _with(argv: list[str], flag: str, *values: str) -> list[str]:
    """``argv`` with ``flag``'s values replaced (the flag appended if absent)."""
    if flag not in argv:
        return [*argv, flag, *values]
    i = argv.index(flag)
    j = i + 1
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    return [*argv[:i + 1], *values, *argv[j:]]


def cell_argv(ctx: dict, cell: Cell, seed: int, run: Path, full_lr: float | None = None,
              data: tuple[Path, Path] | None = None) -> list[str]:
    """The ``jlora finetune`` command line of one run: the recipe's, then the cell's flags."""
    from jlora.demo import finetune_argv

    train, held = data or ctx["data"]
    argv = finetune_argv(ctx["model"], run, train, held, steps=ctx["steps"],
                         batch_size=ctx["batch_size"])
    argv = _with(argv, "--train.seed", str(seed))
    flags = cell.flags(full_lr)
    i = 0
    while i < len(flags):
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        argv = _with(argv, flags[i], *flags[i + 1:j])
        i = j
    return argv


def step_seconds(run: Path) -> list[float]:
    """Per-step wall-clock seconds from the run's metrics (steps after :data:`SKIP_STEPS`)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    t = {h["step"]: h["elapsed_s"] for h in lines if "elapsed_s" in h}
    return [t[i] - t[i - 1] for i in sorted(t) if i > SKIP_STEPS and i - 1 in t]


def train_run(argv: list[str]) -> dict[str, Any]:
    """One ``jlora finetune`` run; its held-out metrics, losses and step times."""
    from jlora.cli.finetune import finetune
    from jlora.cli.parse import parse

    t0 = time.perf_counter()
    cfg = parse(argv)
    run = Path(cfg.out)
    if run.exists():
        shutil.rmtree(run)
    r = finetune(cfg, progress=False, log=lambda _: None)
    steps = step_seconds(run)
    shutil.rmtree(run)
    gc.collect()
    return {"before": r["evals"][0], "after": r["evals"][-1], "losses": r["losses"],
            "train_seconds": r["train_seconds"], "step_seconds": statistics.median(steps),
            "step_seconds_all": steps, "run_seconds": time.perf_counter() - t0}


def zero_shot(argv: list[str]) -> dict[str, Any]:
    """Held-out metrics of the base model (the recipe's session at init: B = 0)."""
    from jlora.cli import tasks as T
    from jlora.cli.finetune import build_session
    from jlora.cli.parse import parse

    cfg = parse(argv)
    s = build_session(cfg, 1)
    evaluate = T.make_evaluate(cfg.task, s.model, _pairs(cfg, "eval"),
                               cfg.train.eval_batch_size, s.shardings.batch)
    m = evaluate(s.state.params, s.frozen)
    return {"before": m, "after": m, "losses": [], "train_seconds": 0.0,
            "step_seconds": None, "step_seconds_all": [], "run_seconds": 0.0}


def _pairs(cfg: Any, split: str, limit: int | None = None) -> dict:
    """The tokenized pairs of ``--data.<split>`` (the first ``limit``)."""
    from jlora.cli import data as D

    fields = [cfg.data.query_field, cfg.data.document_field]
    docs = D.read_texts(getattr(cfg.data, split), fields, split)[:limit]
    return D.pair_arrays(docs, D.load_tokenizer(cfg.model), max_length=cfg.data.max_length,
                         query_field=fields[0], document_field=fields[1])


def _session_step(argv: list[str]) -> tuple[Any, Any, Any]:
    """A run's session (model, state, frozen weights), its train step and its first batch."""
    from jlora import train
    from jlora.cli.finetune import build_session
    from jlora.cli.parse import parse

    cfg = parse(argv)
    s = build_session(cfg, cfg.train.steps)
    batch = train.shard_batch(_pairs(cfg, "train", cfg.train.batch_size), s.shardings.batch,
                              multiple=cfg.train.accum_steps)
    return s, s.train_step(), batch


def compiled_memory(argv: list[str]) -> dict[str, int]:
    """The compiled train step's memory (XLA's memory_analysis) and the trainable params."""
    import jax

    s, step, batch = _session_step(argv)
    mem = step.lower(s.state, s.frozen, batch).compile().memory_analysis()
    out = {k: int(getattr(mem, f"{k}_size_in_bytes"))
           for k in ("temp", "argument", "output", "alias", "generated_code")}
    out["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(s.state.params)))
    del s, step
    gc.collect()
    return out


# --------------------------------------------------------------------------- the sweep
def prepare(args: argparse.Namespace) -> dict:
    """Model dir, data files (written once) and the recipe's knobs, shared by every run."""
    from jlora.demo import RECIPE, model_dir, prepare_data
    from jlora.demo_data import split_by_package, stdlib_pairs, write_jsonl

    work = Path(args.work)
    ctx = {"work": work, "model": args.model or model_dir(),
           "steps": args.steps or RECIPE["steps"],
           "batch_size": args.batch_size or RECIPE["batch_size"]}
    if args.data:
        ctx["data"] = tuple(map(Path, args.data))
        ctx["info"] = {"train_file": args.data[0], "eval_file": args.data[1]}
        ctx["val"] = ctx["data"]
        return ctx
    train, held, info = prepare_data(work)
    ctx["data"], ctx["info"] = (train, held), info
    # the validation split for full fine-tuning's lr: training packages only
    pairs = stdlib_pairs()
    train_pairs, _ = split_by_package(pairs, seed=RECIPE["seed"])
    fit, val = split_by_package(train_pairs, seed=RECIPE["seed"])
    ctx["val"] = (write_jsonl(fit, work / "data" / "val_train.jsonl"),
                  write_jsonl(val, work / "data" / "val_eval.jsonl"))
    ctx["info"]["validation"] = {"train": len(fit), "eval": len(val),
                                 "packages": sorted({p["package"] for p in val})}
    return ctx


def full_lr_grid(ctx: dict, lrs: tuple[float, ...] = FULL_LRS) -> dict:
    """Full fine-tuning at each lr (seed 0) on the validation split; the best recall@1."""
    full = next(c for c in cells() if c.kind == "full")
    runs = []
    for lr in lrs:
        r = train_run(cell_argv(ctx, full, 0, ctx["work"] / "run", lr, data=ctx["val"]))
        runs.append({"lr": lr, "recall@1": r["after"]["eval_recall@1"],
                     "mrr": r["after"]["eval_mrr"]})
        print(f"  full fine-tuning lr {lr:g}: validation recall@1 {runs[-1]['recall@1']:.3f}, "
              f"MRR {runs[-1]['mrr']:.3f}", flush=True)
    best = max(runs, key=lambda x: (x["recall@1"], x["mrr"]))
    return {"runs": runs, "lr": best["lr"]}


def run_cell(ctx: dict, cell: Cell, seeds: tuple[int, ...], full_lr: float | None) -> dict:
    """Every seed of one cell, plus its compiled memory."""
    record: dict[str, Any] = {"name": cell.name, "label": cell.label, "kind": cell.kind,
                              "rank": cell.rank, "targets": cell.targets,
                              "variant": cell.variant, "runs": []}
    run_dir = ctx["work"] / "run"
    if cell.kind == "full":
        record["lr"] = full_lr
    if cell.kind != "zero-shot":
        record["memory"] = compiled_memory(cell_argv(ctx, cell, seeds[0], run_dir, full_lr))
        record["trainable_params"] = record["memory"].pop("trainable_params")
    else:
        record["trainable_params"] = 0
    for seed in seeds:
        t0 = time.perf_counter()
        argv = cell_argv(ctx, cell, seed, run_dir, full_lr)
        r = zero_shot(argv) if cell.kind == "zero-shot" else train_run(argv)
        record["runs"].append({"seed": seed, **r})
        print(f"  {cell.name} seed {seed}: recall@1 {r['before']['eval_recall@1']:.3f} -> "
              f"{r['after']['eval_recall@1']:.3f}, MRR {r['after']['eval_mrr']:.3f}"
              + (f", {r['step_seconds']:.3f} s/step" if r["step_seconds"] else "")
              + f" ({time.perf_counter() - t0:.0f}s; peak RSS {_rss_gib():.1f} GiB)", flush=True)
    return {**record, **aggregate(record["runs"])}


def _rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def aggregate(runs: list[dict]) -> dict:
    """Mean and sample std (n-1) over seeds."""
    def stats(xs):
        return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0

    r = [x["after"]["eval_recall@1"] for x in runs]
    m = [x["after"]["eval_mrr"] for x in runs]
    steps = [x["step_seconds"] for x in runs if x["step_seconds"]]
    out = dict(zip(("recall_mean", "recall_std"), stats(r), strict=True))
    out |= dict(zip(("mrr_mean", "mrr_std"), stats(m), strict=True))
    out["step_seconds"] = statistics.median(steps) if steps else None
    return out


@contextlib.contextmanager
def compile_cache(path: Path):
    """XLA's persistent compilation cache in ``path`` while the sweep runs, so the seeds of a
    config (and its memory measurement) compile its train step once; restored after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(path))
    jax.config.update(keys[1], 1.0)
    cc.reset_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
        cc.reset_cache()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "numpy", "transformers", "tyro")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def step_timer(argv: list[str]) -> Callable[[], float]:
    """The compiled train step of one run's config, on one fixed batch: a function that runs
    one step and returns its wall-clock seconds."""
    import jax

    s, step, batch = _session_step(argv)
    box = {"state": s.state}

    def run() -> float:
        t0 = time.perf_counter()
        box["state"], metrics = step(box["state"], s.frozen, batch)
        jax.block_until_ready((box["state"], metrics))
        return time.perf_counter() - t0

    return run


def retime(ctx: dict, out: Path, *, warmup: int = 3, steps: int = 10, seed: int = 0) -> dict:
    """The stored sweep's step times measured again, in a pass of their own: every trained
    cell's step (seed 0's config) ``warmup`` times, then ``steps`` timed; cells in a random
    order (from ``seed``); the median replaces ``step_seconds`` (the in-run medians stay as
    ``step_seconds_in_runs``). Meant for an otherwise idle machine: the sweep's own step
    times share the CPU with whatever else ran during its hour."""
    import random

    stored = out / "sweep_minilm.json"
    report = json.loads(stored.read_text())
    grid_lr = report["full_lr_grid"]["lr"]
    by_name = {c.name: c for c in cells()}
    records = [r for r in report["cells"] if r["kind"] != "zero-shot"]
    random.Random(seed).shuffle(records)
    for rec in records:
        run = step_timer(cell_argv(ctx, by_name[rec["name"]], 0, ctx["work"] / "run", grid_lr))
        for _ in range(warmup):
            run()
        times = [run() for _ in range(steps)]
        rec.setdefault("step_seconds_in_runs", rec["step_seconds"])
        rec["step_seconds"] = statistics.median(times)
        rec["step_seconds_retimed"] = times
        print(f"  {rec['name']}: {rec['step_seconds']:.3f} s/step (in the sweep's runs: "
              f"{rec['step_seconds_in_runs']:.3f})", flush=True)
        del run
        gc.collect()
    report["retimed"] = {"warmup": warmup, "steps": steps, "order_seed": seed,
                         "order": [r["name"] for r in records],
                         "date": time.strftime("%Y-%m-%d"), "commit": _commit()}
    stored.write_text(json.dumps(report, indent=1) + "\n")
    from experiments.sweep_report import markdown, plot

    (out / "sweep_minilm.md").write_text(markdown(report))
    plot(report, out / "sweep_minilm.png")
    return report


def rerun(ctx: dict, cell: Cell, seed: int, out: Path, full_lr: float | None) -> dict:
    """One cell and seed again; compared with the stored results when there are some."""
    stored = out / "sweep_minilm.json"
    old = json.loads(stored.read_text()) if stored.is_file() else None
    if cell.kind == "full" and full_lr is None:
        full_lr = old["full_lr_grid"]["lr"] if old else full_lr_grid(ctx)["lr"]
    rec = run_cell(ctx, cell, (seed,), full_lr)
    if old:
        prev = next(c for c in old["cells"] if c["name"] == cell.name)
        prev_run = next((r for r in prev["runs"] if r["seed"] == seed), None)
        if prev_run is not None:
            same = all(prev_run["after"][k] == rec["runs"][0]["after"][k]
                       for k in ("eval_recall@1", "eval_mrr"))
            print(f"stored {cell.name} seed {seed}: recall@1 "
                  f"{prev_run['after']['eval_recall@1']:.4f}, MRR "
                  f"{prev_run['after']['eval_mrr']:.4f}: "
                  + ("reproduced exactly" if same else "DIFFERENT"))
            rec["reproduces_stored"] = same
    return rec


def main(argv: list[str] | None = None) -> dict:
    from jlora.train import reuse_host_memory

    reuse_host_memory()  # before any JAX computation, as the jlora command does
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS), help="where the tables and plot go")
    ap.add_argument("--work", default="out/sweep_minilm", help="data and run scratch dir")
    ap.add_argument("--only", choices=[c.name for c in cells()], help="run one cell")
    ap.add_argument("--seed", type=int, default=0, help="the seed of --only")
    ap.add_argument("--full-lr", type=float, help="full fine-tuning's lr (default: the grid)")
    ap.add_argument("--model", help="model dir (default: all-MiniLM-L6-v2)")
    ap.add_argument("--data", nargs=2, metavar=("TRAIN", "EVAL"),
                    help="pair JSONL files (default: the demo's standard-library split)")
    ap.add_argument("--steps", type=int, help="steps per run (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, help="pairs per step (default: the recipe's)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the cells an interrupted sweep finished (<work>/partial.json)")
    ap.add_argument("--retime", action="store_true",
                    help="measure the stored sweep's step times again, in a pass of their "
                         "own on an idle machine (rewrites the table and plot)")
    a = ap.parse_args(argv)
    ctx = prepare(a)
    with compile_cache(ctx["work"] / "xla_cache"):
        if a.retime:
            return retime(ctx, Path(a.out))
        if a.only:
            cell = next(c for c in cells() if c.name == a.only)
            return rerun(ctx, cell, a.seed, Path(a.out), a.full_lr)
        return sweep(ctx, a)


def _elapsed(done: dict, t0: float, cpu0: os.times_result) -> dict:
    """Wall-clock and CPU seconds so far, with those of the interrupted sweep resumed."""
    cpu = os.times()
    return {"seconds": done["seconds"] + time.perf_counter() - t0,
            "cpu_seconds": done["cpu_seconds"] + (cpu.user + cpu.system)
            - (cpu0.user + cpu0.system)}


def sweep(ctx: dict, a: argparse.Namespace) -> dict:
    """Every cell with every seed; writes the JSON, the table and the plot to ``a.out``."""
    t0, cpu0 = time.perf_counter(), os.times()
    partial = ctx["work"] / "partial.json"
    key = {"model": ctx["model"], "steps": ctx["steps"], "batch_size": ctx["batch_size"],
           "data": list(map(str, ctx["data"])), "full_lr": a.full_lr, "seeds": list(SEEDS)}
    done = json.loads(partial.read_text()) if a.resume and partial.is_file() else {}
    if done.get("key") != key:
        done = {"key": key, "cells": {}, "seconds": 0.0, "cpu_seconds": 0.0}
    print("full fine-tuning lr grid on the validation split:", flush=True)
    grid = done.get("grid") or ({"runs": [], "lr": a.full_lr} if a.full_lr
                                else full_lr_grid(ctx))
    done["grid"] = grid
    records = []
    for cell in cells():
        print(f"{cell.label}:", flush=True)
        if cell.name not in done["cells"]:
            done["cells"][cell.name] = run_cell(ctx, cell, SEEDS, grid["lr"])
            partial.write_text(json.dumps(done | _elapsed(done, t0, cpu0)))
        records.append(done["cells"][cell.name])
    done |= _elapsed(done, t0, cpu0)
    from jlora.demo import RECIPE

    report = {"recipe": {**RECIPE, "steps": ctx["steps"], "batch_size": ctx["batch_size"]},
              "data": ctx["info"], "seeds": list(SEEDS), "full_lr_grid": grid,
              "cells": records, "wall_seconds": done["seconds"],
              "cpu_seconds": done["cpu_seconds"],
              "versions": _versions(), "machine": _machine(), "commit": _commit(),
              "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_minilm.json").write_text(json.dumps(report, indent=1) + "\n")
    from experiments.sweep_report import markdown, plot

    (out / "sweep_minilm.md").write_text(markdown(report))
    plot(report, out / "sweep_minilm.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
