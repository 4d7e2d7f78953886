"""The report of :mod:`experiments.causal_lm`: ``causal_lm.json`` (everything measured, with
versions and machine), ``causal_lm.md`` (the tables and generations) and ``causal_lm.png``
(held-out prose perplexity against trainable parameters, the evaluation curves, and the
held-out code perplexity after adaptation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

NAME = "causal_lm"


def label(name: str) -> str:
    return "full fine-tuning" if name == "full" else f"LoRA r={name.removeprefix('lora_r')}"


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Writes ``causal_lm.{json,md,png}`` to ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{NAME}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return paths


def _n(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def markdown(r: dict[str, Any]) -> str:
    d, s, pre = r["data"], r["scale"], r["pretrain"]
    cfg = r.get("configs", {})
    total = d["params"]
    lines = [
        "# Causal-LM adaptation: LoRA vs full fine-tuning on a small Llama",
        "",
        "`python -m experiments.causal_lm` (seed {seed}); every run is `jlora finetune "
        "--config experiments/configs/<run>.yaml`.".format(seed=r["seed"]),
        "",
        "**Model.** A Llama with {p:,} parameters ({l} layers, hidden {h}, MLP {m}, {a} heads, "
        "tied embeddings, vocabulary {v:,}), randomly initialised with transformers. "
        "**Tokenizer.** Byte-level BPE trained on the {n} standard-library source files of the "
        "training split: every text encodes (no unknown token); its English comes from the "
        "sources' docstrings and comments, and it spends {cp:.2f} characters per token on "
        "held-out prose against {cc:.2f} on held-out code.".format(
            p=total, l=s["num_hidden_layers"], h=s["hidden_size"], m=s["intermediate_size"],
            a=s["num_attention_heads"], v=d["vocab_size"], n=d["code_train_files"],
            cp=d["chars_per_token"]["prose_eval"], cc=d["chars_per_token"]["code_eval"]),
        "",
        "**Pretraining** (`causal_lm_pretrain.yaml`, full fine-tuning, {st} steps of {bt} "
        "tokens{cfg}): standard-library sources split by top-level module ({ct:,} training "
        "characters; {ce:,} held out in {cf} file{pl}), `pydoc_data` left out. Held-out code "
        "perplexity {b:.1f} -> {a:.2f}.".format(
            st=pre["steps"], bt=_tokens_per_step(cfg.get("pretrain")),
            cfg=_recipe(cfg.get("pretrain")), ct=d["chars"]["code_train"],
            ce=d["chars"]["code_eval"], cf=d["code_eval_files"],
            pl="" if d["code_eval_files"] == 1 else "s", b=pre["ppl_before"],
            a=pre["ppl_best"]),
        "",
        "**Adaptation** to English prose: `pydoc_data.topics` (the language reference's "
        "topics), {tt} topics ({tc:,} characters) for training and {et} held-out topics "
        "({ec:,} characters) for evaluation. Each run exports its best evaluation (every "
        "{ee} steps); the held-out code perplexity after adaptation measures what it forgot "
        "(pretrained: {cpp:.2f}).".format(
            tt=d["prose_train_topics"], tc=d["chars"]["prose_train"],
            et=d["prose_eval_topics"], ec=d["chars"]["prose_eval"],
            ee=(cfg.get("full") or {}).get("train", {}).get("eval_every", "?"),
            cpp=r["code_ppl_pretrained"]),
        "",
        "| run | recipe | trainable params | % of model | held-out prose ppl: before -> best "
        "(step) | held-out code ppl after | ms/step | tokens/s | training s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name, a in r["adapt"].items():
        lines.append(
            f"| {label(name)} | {_recipe(cfg.get(name), short=True)} | {a['trainable']:,} | "
            f"{100 * a['trainable'] / total:.2f} | {a['ppl_before']:.2f} -> "
            f"**{a['ppl_best']:.2f}** ({a['best_step']}) | {a['code_ppl_after']:.2f} | "
            f"{1000 * a['step_s']:.0f} | {_n(a['tokens_per_s'])} | {a['train_s']:.0f} |")
    lines += ["", "ms/step: the median wall-clock time between consecutive steps after the "
              "first five (compilation), so evaluations and checkpoints do not count; "
              "tokens/s: a batch's tokens over that time; the runs go one after another.", "",
              "## Generations", "",
              f"Greedy, {s['max_new_tokens']} new tokens, `jlora generate` (the LoRA runs: "
              "the pretrained model with `--adapter`).", ""]
    for i, prompt in enumerate(r["prompts"]):
        lines += [f"**Prompt** `{json.dumps(prompt)[1:-1]}`", "", "| model | completion |",
                  "|---|---|"]
        for name, texts in r["generations"].items():
            who = "pretrained (before)" if name == "pretrained" else label(name)
            lines.append(f"| {who} | {_cell(texts[i])} |")
        lines.append("")
    v = ", ".join(f"{k} {x}" for k, x in r["versions"].items())
    src = r.get("source", {})
    mod = f" (with local changes to {', '.join(src['modified'])})" if src.get("modified") else ""
    if src.get("changed_during_run"):
        mod += " (**the library changed during the run**: its numbers mix two versions)"
    lines += [f"jlora at commit {src.get('commit', '?')[:10]}{mod}. "
              f"Machine: {r['machine']}. Versions: {v}. The whole experiment: "
              f"{r['wall_s'] / 60:.1f} min wall-clock, {r['cpu_s'] / 60:.1f} min of CPU "
              "time" + (" (resumed: the runs that had finished before do not count)"
                        if r.get("resumed") else "") + ".", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return "`" + json.dumps(text)[1:-1].replace("|", "\\|").replace("`", "'") + "`"


def _tokens_per_step(cfg: dict | None) -> str:
    if not cfg:
        return "?"
    return f"{cfg['train']['batch_size']} x {cfg['data']['max_length']}"


def _recipe(cfg: dict | None, short: bool = False) -> str:
    if not cfg:
        return ""
    o, t = cfg["optim"], cfg["train"]
    parts = [f"lr {o['lr']:g}"]
    if "lora" in cfg and not cfg.get("full"):
        parts.insert(0, f"alpha {cfg['lora']['alpha']:g}, {', '.join(cfg['lora']['targets'])}")
    if short:
        return ", ".join(parts)
    return ", AdamW " + ", ".join(parts) + f" (warm-up {o.get('warmup_steps', 0)}, " \
        f"{o.get('schedule', 'cosine')}), batch {t['batch_size']}"


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapt = r["adapt"]
    lora = [(a["trainable"], a, n) for n, a in adapt.items() if n != "full"]
    full = adapt.get("full")
    before = next(iter(adapt.values()))["ppl_before"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, title, base in ((axes[0], "ppl_best", "held-out prose perplexity (best)",
                                  before),
                                 (axes[2], "code_ppl_after", "held-out code perplexity after "
                                  "adaptation (forgetting)", r["code_ppl_pretrained"])):
        ax.plot([x for x, _, _ in lora], [a[key] for _, a, _ in lora], "o-", label="LoRA")
        for x, a, n in lora:
            ax.annotate(f"r={n.removeprefix('lora_r')}", (x, a[key]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        if full is not None:
            ax.plot([full["trainable"]], [full[key]], "*", ms=12, label="full fine-tuning")
        ax.axhline(base, ls="--", c="gray", label="pretrained (no adaptation)")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[1]
    for name, a in adapt.items():
        steps, ppl = zip(*a["curve"])
        ax.plot(steps, ppl, label=label(name), ls="-" if name != "full" else "--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("held-out prose perplexity during adaptation", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(f"Llama {r['data']['params'] / 1e6:.1f}M pretrained on Python sources, "
                 "adapted to English prose (pydoc_data.topics)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
