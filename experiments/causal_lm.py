"""Causal-LM adaptation: a small Llama pretrained on Python sources, adapted to English prose.

1. A byte-level BPE tokenizer (the ``tokenizers`` library) is trained on the standard
   library's own ``*.py`` sources. Byte-level: every text encodes, nothing is unknown; the
   English it knows comes from the docstrings and comments of those sources.
2. A small Llama (transformers ``LlamaConfig``, random init) is written with that tokenizer
   and pretrained by ``jlora finetune --full`` on the sources, split by top-level module
   (held-out modules for evaluation; ``pydoc_data``, the prose of step 3, is left out).
3. The pretrained model is adapted to English prose (``pydoc_data.topics``, held-out topics
   for evaluation) by full fine-tuning and by LoRA at several ranks on every linear layer,
   each a ``jlora finetune`` run from a committed config (``experiments/configs/``).
4. For each: held-out prose perplexity before/after (the best evaluation), trainable
   parameters, steady-state step time, held-out code perplexity after (forgetting), and
   greedy generations from a few prompts (``jlora generate``) before/after.

  python -m experiments.causal_lm            # ~35 minutes on 2 CPU cores
  python -m experiments.causal_lm --resume   # after a failure: keeps the finished runs

Writes ``experiments/results/causal_lm.{md,json,png}``; the runs stay in ``out/causal_lm``.
Everything is a function of ``--seed``: the data split, the model's init, the runs' seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
MARKER = ".causal_lm"
# not pretraining data: tests and tools (repetitive), codec tables, and pydoc_data (the prose)
SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip",
        "site-packages", "encodings", "pydoc_data", "__pycache__"}
PROMPTS = ("The try statement specifies", "A class definition", "If the expression is false,",
           "def read_lines(path):\n")


@dataclasses.dataclass(frozen=True)
class Scale:
    """The sizes of one run of the experiment; ``flags`` override every run's config."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 704
    code_eval_chars: int = 150_000   # held-out modules until this many characters
    code_max_chars: int | None = None  # cap on the training sources (None: all)
    prose_eval_fraction: float = 0.2  # held-out topics: this share of the characters
    ranks: tuple[int, ...] = (1, 4, 16, 64)
    max_new_tokens: int = 40
    flags: tuple[str, ...] = ()


FULL = Scale()
TINY = Scale(vocab_size=320, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
             code_eval_chars=20_000, code_max_chars=60_000, ranks=(4,), max_new_tokens=4,
             flags=("--data.max-length", "32", "--train.batch-size", "8", "--train.steps", "2",
                    "--train.eval-every", "2", "--train.save-every", "2"))


# --------------------------------------------------------------------------------- data
def code_split(seed: int, scale: Scale) -> tuple[list[str], list[str]]:
    """The standard library's sources as ``(train, eval)`` texts, split by top-level module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[str]] = {}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP & set(rel.parts):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            groups.setdefault(rel.parts[0].removesuffix(".py"), []).append(text)
    names = sorted(groups)
    order = np.random.default_rng([seed, 0]).permutation(len(names))
    train, held = [], []
    for i in order:
        texts = groups[names[i]]
        if sum(map(len, held)) < scale.code_eval_chars:
            held += texts
        elif scale.code_max_chars is None or sum(map(len, train)) < scale.code_max_chars:
            train += texts
    return train, held


def prose_split(seed: int, scale: Scale) -> tuple[list[str], list[str]]:
    """``pydoc_data.topics`` (the language reference's topics) as ``(train, eval)`` texts."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    names = sorted(topics)
    order = np.random.default_rng([seed, 1]).permutation(len(names))
    total = sum(len(topics[n]) for n in names)
    train, held = [], []
    for i in order:
        text = topics[names[i]]
        (held if sum(map(len, held)) < scale.prose_eval_fraction * total else train).append(text)
    return train, held


def write_jsonl(path: Path, texts: Sequence[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def train_tokenizer(texts: Sequence[str], vocab_size: int, path: Path) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def chars_per_token(tokenizer: Any, texts: Sequence[str]) -> float:
    n = sum(len(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
            for t in texts)
    return sum(map(len, texts)) / max(n, 1)


def write_model(path: Path, scale: Scale, tokenizer: Any, seed: int) -> int:
    """A randomly initialised Llama with ``tokenizer``, as a transformers directory."""
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=scale.hidden_size,
                         intermediate_size=scale.intermediate_size,
                         num_hidden_layers=scale.num_hidden_layers,
                         num_attention_heads=scale.num_attention_heads,
                         num_key_value_heads=scale.num_attention_heads,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ the command
Jlora = Callable[[list[str]], str]


def subprocess_jlora(argv: list[str]) -> str:
    """``jlora ARGV`` in a new process (what a user types), its output shown as it comes
    (the progress bar on stderr); returns its stdout."""
    print("$ jlora " + " ".join(argv), flush=True)
    lines = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen([sys.executable, "-m", "jlora.cli", *argv], stdout=subprocess.PIPE,
                          text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, ["jlora", *argv])
    return "".join(lines)


def inprocess_jlora(argv: list[str]) -> str:
    """``jlora ARGV`` through :func:`jlora.cli.main` in this process (for the tests)."""
    from jlora.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"jlora {' '.join(argv)} exited with {rc}")
    return buf.getvalue()


def finetune(jlora: Jlora, config: str, model: Path, out: Path, data: tuple[Path, Path],
             scale: Scale, seed: int) -> dict[str, Any]:
    """``jlora finetune --config configs/<config>.yaml``; the run's numbers. A run that
    finished already (its ``summary.json`` is there: ``--resume``) is read, not rerun; one
    that did not is started again from scratch."""
    if (out / "summary.json").is_file():
        print(f"{out}: finished already, reading its results", flush=True)
    else:
        if out.exists():
            shutil.rmtree(out)
        _run_finetune(jlora, config, model, out, data, scale, seed)
    return run_results(config, out)


def _run_finetune(jlora: Jlora, config: str, model: Path, out: Path, data: tuple[Path, Path],
                  scale: Scale, seed: int) -> None:
    jlora(["finetune", "--config", str(CONFIGS / f"{config}.yaml"), "--model", str(model),
           "--out", str(out), "--data.train", str(data[0]), "--data.eval", str(data[1]),
           "--train.seed", str(seed), *scale.flags])


def run_results(config: str, out: Path) -> dict[str, Any]:
    """A finished run's numbers, from its ``summary.json``, ``metrics.jsonl`` and export."""
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    dt = np.diff([r["elapsed_s"] for r in steps]) / np.diff([r["step"] for r in steps])
    steady = dt[min(5, len(dt) // 2):] if len(dt) > 1 else dt
    best = summary["best"]
    cfg = run_config(out)
    step_s = float(np.median(steady)) if len(steady) else float("nan")
    return {"config": f"experiments/configs/{config}.yaml",
            "trainable": trainable_params(out),
            "steps": summary["steps"], "train_s": summary["train_seconds"],
            "step_s": step_s,
            "tokens_per_s": cfg["train"]["batch_size"] * cfg["data"]["max_length"] / step_s,
            "ppl_before": evals[0]["eval_perplexity"], "ppl_best": best["eval_perplexity"],
            "best_step": best["step"], "ppl_last": evals[-1]["eval_perplexity"],
            "curve": [(r["step"], r["eval_perplexity"]) for r in evals]}


def trainable_params(run: Path) -> int:
    """What a run trained: the PEFT adapter's tensors, or the whole exported model's."""
    from jlora.hf.io import checkpoint_index, read_header

    if (run / "model").is_dir():
        shapes = [i.shape for i in checkpoint_index(run / "model").values()]
    else:
        shapes = [i.shape for i in read_header(run / "adapter" / "adapter_model.safetensors")
                  .values()]
    return sum(int(np.prod(s)) for s in shapes)


def run_config(run_dir: Path) -> dict[str, Any]:
    """A run's effective config (its config.yaml) without the paths of this machine."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in ("model", "out", "resume"):
        cfg.pop(key, None)
    for key in ("train", "eval"):
        cfg["data"].pop(key, None)
    return cfg


def generations(jlora: Jlora, model: Path, adapter: Path | None, scale: Scale) -> list[str]:
    argv = ["generate", "--model", str(model), "--max-new-tokens", str(scale.max_new_tokens),
            "--prompt", *PROMPTS]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    return [json.loads(line)["completion"] for line in jlora(argv).strip().splitlines()]


def code_perplexity(model: Path, adapter: Path | None, texts: Path, max_length: int) -> float:
    """Held-out code perplexity of ``model`` (+ ``adapter``): forgetting after the prose."""
    import jax

    import jlora
    from jlora.cli import data as D

    tokenizer = D.load_tokenizer(str(model))
    arrays = D.causal_lm_arrays(D.read_texts([str(texts)], ["text"], "eval"), tokenizer,
                                max_length=max_length, packing=True, text_field="text",
                                prompt_field=None, completion_field="completion")
    net, params, _ = jlora.hf.load(model)
    if adapter is not None:
        params, _ = jlora.hf.load_peft(params, adapter)
    loss_fn = jax.jit(jlora.train.causal_lm_loss(net.apply))
    total = count = 0.0
    for batch, _ in D.eval_batches(arrays, 32):
        loss, aux = loss_fn(params, batch, None)
        total, count = total + float(loss) * float(aux["tokens"]), count + float(aux["tokens"])
    return float(np.exp(total / count))


def max_length(scale: Scale) -> int:
    import yaml

    if "--data.max-length" in scale.flags:
        return int(scale.flags[scale.flags.index("--data.max-length") + 1])
    return int(yaml.safe_load((CONFIGS / "causal_lm_pretrain.yaml").read_text())["data"]
               ["max_length"])


# --------------------------------------------------------------------------- pipeline
def prepare(work: Path, resume: bool = False) -> None:
    """Empties ``work`` (keeps it with ``resume``) if this experiment made it; refuses a
    directory it did not make."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise SystemExit(f"{work} holds files this experiment did not write; give an "
                             "empty or new --work directory.")
        if not resume:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by python -m experiments.causal_lm\n")


def run(work: Path, *, seed: int = 0, scale: Scale = FULL, jlora: Jlora = subprocess_jlora,
        results: Path | None = RESULTS, resume: bool = False) -> dict[str, Any]:
    """The whole experiment in ``work``; writes the report to ``results`` (None: no report).

    With ``resume``, the runs that finished in ``work`` (with the same ``seed``) are kept and
    the others run; the data and the initial model are rebuilt (they depend on the seed
    alone)."""
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    source = _source()
    seed_file = work / "seed"
    if resume and seed_file.is_file() and int(seed_file.read_text()) != seed:
        raise SystemExit(f"--resume: {work} holds runs of seed {seed_file.read_text().strip()}"
                         f", not {seed}.")
    prepare(work, resume)
    seed_file.write_text(f"{seed}\n")
    data = work / "data"
    data.mkdir(exist_ok=True)
    code_train, code_eval = code_split(seed, scale)
    prose_train, prose_eval = prose_split(seed, scale)
    files = {name: write_jsonl(data / f"{name}.jsonl", texts) for name, texts in
             (("code_train", code_train), ("code_eval", code_eval),
              ("prose_train", prose_train), ("prose_eval", prose_eval))}
    tokenizer = train_tokenizer(code_train, scale.vocab_size, work / "base")
    params = write_model(work / "base", scale, tokenizer, seed)
    stats = {"code_train_files": len(code_train), "code_eval_files": len(code_eval),
             "prose_train_topics": len(prose_train), "prose_eval_topics": len(prose_eval),
             "chars": {k: sum(len(t) for t in v) for k, v in
                       (("code_train", code_train), ("code_eval", code_eval),
                        ("prose_train", prose_train), ("prose_eval", prose_eval))},
             "vocab_size": len(tokenizer), "params": params,
             "chars_per_token": {"code_eval": chars_per_token(tokenizer, code_eval),
                                 "prose_eval": chars_per_token(tokenizer, prose_eval)}}

    runs = work / "runs"
    pre = finetune(jlora, "causal_lm_pretrain", work / "base", runs / "pretrain",
                   (files["code_train"], files["code_eval"]), scale, seed)
    base = runs / "pretrain" / "model"
    prose = (files["prose_train"], files["prose_eval"])
    adapt = {"full": finetune(jlora, "causal_lm_prose_full", base, runs / "prose_full", prose,
                              scale, seed)}
    for r in scale.ranks:
        adapt[f"lora_r{r}"] = finetune(jlora, f"causal_lm_prose_lora_r{r}", base,
                                       runs / f"prose_lora_r{r}", prose, scale, seed)
    length = max_length(scale)
    before_code = code_perplexity(base, None, files["code_eval"], length)
    gens = {"pretrained": generations(jlora, base, None, scale)}
    for name, res in adapt.items():
        run_dir = runs / f"prose_{name}"
        model, adapter = (run_dir / "model", None) if name == "full" else (base,
                                                                           run_dir / "adapter")
        res["code_ppl_after"] = code_perplexity(model, adapter, files["code_eval"], length)
        gens[name] = generations(jlora, model, adapter, scale)
    configs = {name: run_config(runs / ("pretrain" if name == "pretrain" else f"prose_{name}"))
               for name in ("pretrain", *adapt)}
    report = {"seed": seed, "scale": dataclasses.asdict(scale), "data": stats,
              "configs": configs,
              "pretrain": pre, "code_ppl_pretrained": before_code, "adapt": adapt,
              "prompts": list(PROMPTS), "generations": gens, "versions": _versions(),
              "source": source | ({} if _same_library(_source(), source)
                                 else {"changed_during_run": True}),
              "machine": _machine(), "resumed": resume, "wall_s": time.perf_counter() - t0,
              "cpu_s": _cpu_seconds() - cpu0}
    if results is not None:
        from experiments.causal_lm_report import write_report

        write_report(report, results)
    return report


def _cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("jlora", "jax", "jaxlib", "flax", "optax", "transformers", "tokenizers", "torch")
    return {n: md.version(n) for n in names} | {"python": platform.python_version()}


def _source() -> dict[str, Any]:
    """The commit the library ran from, its ``jlora/`` tree, and its files that differed from
    it (with their contents' hash, so that an edit during the run shows)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True,
                              text=True).stdout.strip()

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "jlora").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "jlora_tree": git("rev-parse", "HEAD:jlora"),
            "modified": dirty,
            "modified_hash": git("hash-object", *dirty) if dirty else ""}


def _same_library(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`_source` records hold the same library (commits elsewhere in the
    repository do not count)."""
    return {k: v for k, v in a.items() if k != "commit"} == \
        {k: v for k, v in b.items() if k != "commit"}


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("out/causal_lm"),
                   help="where the data, models and runs go (emptied first)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny model and a few steps (a smoke test); the report goes to "
                        "WORK/results")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs that finished in WORK (after a failure) and do the rest")
    args = p.parse_args(argv)
    from jlora.train import reuse_host_memory

    reuse_host_memory()
    scale = TINY if args.tiny else FULL
    return run(args.work, seed=args.seed, scale=scale,
               results=args.work / "results" if args.tiny else RESULTS, resume=args.resume)


if __name__ == "__main__":
    main()
