"""The `make demo` recipe run by jlora and by peft + sentence-transformers, in one run.

Both sides train rank-8 LoRA adapters on all-MiniLM-L6-v2 for standard-library code search
(:mod:`jlora.demo_data`, split by package) with the same recipe (:data:`jlora.demo.RECIPE`):
the same pairs, split, initial adapter (jlora's, loaded into peft), batches in the same
order, symmetric in-batch contrastive loss at temperature 0.05, AdamW with warm-up + cosine
schedule and clipping, LoRA dropout, max length and seed. jlora runs through its CLI
(``jlora finetune``); peft runs a PyTorch loop on a sentence-transformers model (base
dropout off, as jlora's base model runs deterministically; batches padded to their longest
row, as sentence-transformers does). Each contender runs in its own process, in a random
order, on an otherwise idle machine; the training time excludes evaluation.

  python -m experiments.demo_vs_peft            # ~10 minutes on 2 CPU cores

Writes ``experiments/results/demo_vs_peft.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "flax", "optax", "torch", "peft", "transformers",
             "sentence-transformers")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def write_init_adapter(path: Path) -> None:
    """The adapter jlora's CLI starts from (inject with the recipe's seed), as a PEFT dir."""
    import jax

    import jlora
    from jlora.cli.parse import parse
    from jlora.demo import RECIPE, finetune_argv, model_dir

    cfg = parse(finetune_argv(model_dir(), path / "unused", path, path, steps=1,
                              batch_size=RECIPE["batch_size"]))
    lora_config = cfg.lora.to_config()
    _, params, hf_config = jlora.hf.load(model_dir())
    params = jlora.inject(params, lora_config, jax.random.key(cfg.train.seed))
    jlora.hf.save_peft(params, lora_config, path, hf_config=hf_config)


# --------------------------------------------------------------------------- peft worker
def peft_worker(data: Path, init_adapter: Path, out: Path, steps: int, batch_size: int) -> None:
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import get_cosine_schedule_with_warmup

    from jlora.cli.data import batch_source
    from jlora.cli.tasks import retrieval_metrics
    from jlora.demo import RECIPE, model_dir

    torch.manual_seed(RECIPE["seed"])
    torch.set_num_threads(os.cpu_count() or 1)
    st = SentenceTransformer(model_dir(), device="cpu",
                             config_kwargs={"hidden_dropout_prob": 0.0,
                                            "attention_probs_dropout_prob": 0.0})
    st.max_seq_length = RECIPE["max_length"]
    st[0].model = PeftModel.from_pretrained(st[0].model, str(init_adapter), is_trainable=True)
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (data / "eval.jsonl").read_text().splitlines()]

    def evaluate() -> dict[str, float]:
        st.eval()
        with torch.no_grad():
            q = st.encode([p["query"] for p in test], convert_to_numpy=True, batch_size=64)
            d = st.encode([p["document"] for p in test], convert_to_numpy=True, batch_size=64)
        return retrieval_metrics(q, d)

    before = evaluate()
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=RECIPE["lr"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, RECIPE["warmup_steps"], steps)
    source = batch_source({"i": np.arange(len(train))[:, None]}, batch_size, RECIPE["seed"])
    losses, t0 = [], time.perf_counter()
    st.train()
    for position in range(steps):
        idx = source(position)["i"][:, 0]
        texts = [train[i]["query"] for i in idx] + [train[i]["document"] for i in idx]
        features = st.preprocess(texts)
        emb = st(features)["sentence_embedding"]
        q, d = emb[:batch_size], emb[batch_size:]
        logits = q @ d.T / RECIPE["temperature"]
        labels = torch.arange(batch_size)
        ce = torch.nn.functional.cross_entropy
        loss = 0.5 * (ce(logits, labels) + ce(logits.T, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, RECIPE["clip_norm"])
        opt.step()
        sched.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    after = evaluate()
    out.write_text(json.dumps({"before": before, "after": after, "train_seconds": seconds,
                               "losses": losses}))


# --------------------------------------------------------------------------- jlora worker
def jlora_worker(data: Path, out: Path, steps: int, batch_size: int) -> None:
    from jlora.train import reuse_host_memory

    reuse_host_memory()  # what the jlora command does first
    from jlora.cli.finetune import finetune
    from jlora.cli.parse import parse
    from jlora.demo import finetune_argv, model_dir

    run = Path(tempfile.mkdtemp()) / "run"
    r = finetune(parse(finetune_argv(model_dir(), run, data / "train.jsonl",
                                     data / "eval.jsonl", steps=steps, batch_size=batch_size)),
                 progress=False)
    last = r["evals"][-1]
    out.write_text(json.dumps({"before": r["evals"][0], "after": last,
                               "train_seconds": r["train_seconds"], "losses": r["losses"]}))


# --------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> dict:
    from jlora.demo import RECIPE, prepare_data

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=RECIPE["steps"])
    ap.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    ap.add_argument("--seed", type=int, default=0, help="seed of the contenders' order")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each contender")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", choices=["jlora", "peft"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        work = Path(a.work)
        if a.worker == "peft":
            peft_worker(work / "data", work / "init_adapter", work / "peft.json", a.steps,
                        a.batch_size)
        else:
            jlora_worker(work / "data", work / "jlora.json", a.steps, a.batch_size)
        return {}

    work = Path(tempfile.mkdtemp(prefix="demo_vs_peft-"))
    _, _, info = prepare_data(work)
    write_init_adapter(work / "init_adapter")
    rng = random.Random(a.seed)
    runs: dict[str, list[dict]] = {"jlora": [], "peft": []}
    orders = []
    for round_ in range(a.rounds):
        order = ["jlora", "peft"]
        rng.shuffle(order)
        if round_ % 2:  # every other round reverses the previous one: each goes first as often
            order = orders[-1][::-1]
        orders.append(order)
        for name in order:
            print(f"round {round_ + 1}: running {name} ...", flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "experiments.demo_vs_peft", "--worker", name,
                            "--work", str(work), "--steps", str(a.steps), "--batch-size",
                            str(a.batch_size)], check=True, cwd=Path(__file__).parent.parent,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            r = json.loads((work / f"{name}.json").read_text())
            r["process_seconds"] = time.perf_counter() - t0
            runs[name].append(r)
            print(f"  {name}: recall@1 {r['before']['eval_recall@1']:.3f} -> "
                  f"{r['after']['eval_recall@1']:.3f} in {r['train_seconds']:.1f}s of training",
                  flush=True)
    results = {}
    for name, rs in runs.items():
        results[name] = {**rs[-1], "train_seconds": statistics.median(
            r["train_seconds"] for r in rs), "train_seconds_runs": [r["train_seconds"] for r in rs],
            "recall_after_runs": [r["after"]["eval_recall@1"] for r in rs]}
        results[name].pop("losses", None)
    report = {"recipe": {**RECIPE, "steps": a.steps, "batch_size": a.batch_size},
              "data": info, "orders": orders, "results": results, "versions": _versions(),
              "machine": _machine(), "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_vs_peft.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "demo_vs_peft.md").write_text(markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    r, res = report["recipe"], report["results"]
    peft_s = res["peft"]["train_seconds"]
    rows = []
    for name, label in (("jlora", "jlora (JAX, `jlora finetune`)"),
                        ("peft", "peft + sentence-transformers (PyTorch)")):
        x = res[name]
        rows.append(f"| {label} | {x['before']['eval_recall@1']:.3f} -> "
                    f"{x['after']['eval_recall@1']:.3f} | {x['before']['eval_mrr']:.3f} -> "
                    f"{x['after']['eval_mrr']:.3f} | {x['train_seconds']:.1f} ("
                    + ", ".join(f"{t:.1f}" for t in x["train_seconds_runs"]) + ") | "
                    f"{x['train_seconds'] / peft_s:.2f} |")
    d = report["data"]
    return "\n".join([
        "# `make demo` recipe: jlora vs peft, same run", "",
        f"all-MiniLM-L6-v2, standard-library code search: {d['train']} training pairs, "
        f"{d['test']} held out from {len(d['test_packages'])} unseen packages. LoRA rank "
        f"{r['rank']} (alpha {r['alpha']}) on {', '.join(r['targets'])}, {r['steps']} steps "
        f"of {r['batch_size']} pairs, max length {r['max_length']}, lr {r['lr']} "
        f"(warm-up {r['warmup_steps']}, cosine), clip {r['clip_norm']}, dropout "
        f"{r['dropout']}, temperature {r['temperature']}; same initial adapter and batch "
        f"order on both sides. {len(report['orders'])} rounds, each running both contenders "
        f"(orders: {'; '.join(', '.join(o) for o in report['orders'])}); training "
        "time is the median over rounds and excludes evaluation, model loading and "
        "tokenization (jlora's includes compiling the step).", "",
        "| contender | held-out recall@1 | held-out MRR | training s (runs) | vs peft |",
        "|---|---|---|---:|---:|", *rows, "",
        f"Machine: {report['machine']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", ""])


if __name__ == "__main__":
    main()
