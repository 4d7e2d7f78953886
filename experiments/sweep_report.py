"""The table and plot of :mod:`experiments.sweep_minilm`, from its JSON report."""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def markdown(report: dict) -> str:
    r, d = report["recipe"], report["data"]
    cells = report["cells"]
    full = next(c for c in cells if c["kind"] == "full")
    rows = []
    for c in cells:
        mem = c.get("memory")
        mib = f"{(mem['temp'] + mem['argument']) / MIB:,.0f}" if mem else "–"
        step = f"{c['step_seconds']:.3f}" if c["step_seconds"] else "–"
        per_seed = ", ".join(f"{x['after']['eval_recall@1']:.3f}" for x in c["runs"])
        label = c["label"] + (f" (lr {c['lr']:g})" if c.get("lr") else "")
        rows.append(f"| {label} | {c['trainable_params']:,} | "
                    f"{_pm(c['recall_mean'], c['recall_std'])} | "
                    f"{c['recall_mean'] - full['recall_mean']:+.3f} | "
                    f"{_pm(c['mrr_mean'], c['mrr_std'])} | {per_seed} | {step} | {mib} |")
    grid = report["full_lr_grid"]
    grid_rows = [f"| {g['lr']:g} | {g['recall@1']:.3f} | {g['mrr']:.3f} |"
                 for g in grid["runs"]]
    zero = next(c for c in cells if c["kind"] == "zero-shot")["recall_mean"]
    starts = {round(x["before"]["eval_recall@1"], 6) for c in cells if c["kind"] != "full"
              for x in c["runs"]}
    val = d.get("validation", {})
    lines = [
        "# Rank and targets sweep: all-MiniLM-L6-v2, standard-library code search", "",
        f"The `make demo` task: {d.get('train', '?')} training pairs, {d.get('test', '?')} "
        f"held out from {len(d.get('test_packages', [])) or '?'} packages never seen in "
        f"training. Every run is `jlora finetune` with the demo's recipe: {r['steps']} steps "
        f"of {r['batch_size']} pairs, max length {r['max_length']}, AdamW lr {r['lr']} "
        f"(warm-up {r['warmup_steps']}, {r['schedule']}), clip {r['clip_norm']}, temperature "
        f"{r['temperature']}, LoRA alpha {r['alpha']} at every rank (scale alpha/r; rsLoRA "
        f"alpha/sqrt(r)), dropout {r['dropout']}. Only the cell's own settings change. "
        f"Seeds {', '.join(map(str, report['seeds']))} per cell (adapter init, data order, "
        "dropout); ± is the sample standard deviation over seeds. Metrics are after the "
        "last step. \"all linear\" is the recipe's targets (query, key, value, dense: every "
        "linear layer of the encoder, and the unused pooler's, whose adapter is counted but "
        "never trained under mean pooling).", "",
        "| cell | trainable params | recall@1 | vs full | MRR | recall@1 per seed | step s | "
        "compiled MiB (temp + args) |",
        "|---|---:|---|---:|---|---|---:|---:|", *rows, "",
        "vs full: the difference of mean recall@1 from full fine-tuning's.",
        (f"Step s: median wall-clock seconds of {report['retimed']['steps']} train steps "
         f"(after {report['retimed']['warmup']} warm-up steps) of each cell's config, timed "
         "in a pass of their own (`--retime`), cells in random order, on an otherwise idle "
         "machine." if "retimed" in report else
         "Step s: median wall-clock seconds of steps 3 onwards (the first compiles), median "
         "over seeds.") + " Compiled MiB: XLA's memory analysis of the compiled train step, "
        "temporaries plus arguments (frozen weights, trainable state, batch), once per "
        "config.", "",
        f"Full fine-tuning's lr: {grid['lr']:g}, "
        + (f"the best recall@1 of a grid run once (seed 0) on a validation split of the "
           f"training packages ({val.get('train', '?')} pairs to train, {val.get('eval', '?')}"
           " to validate; the held-out packages were not used to choose it):"
           if grid["runs"] else "given on the command line."), "",
        *(["| lr | validation recall@1 | validation MRR |", "|---:|---:|---:|", *grid_rows,
           ""] if grid_rows else []),
        f"Zero-shot recall@1 is {zero:.3f}; the step-0 evaluation of every LoRA run "
        f"gave {', '.join(f'{x:.3f}' for x in sorted(starts))} (PiSSA and OLoRA rewrite the "
        "kernels to a residual, so their start may differ by rounding).", "",
        f"Sweep time: {report['wall_seconds'] / 60:.1f} min wall-clock, "
        f"{report['cpu_seconds'] / 60:.1f} min of CPU. Machine: {report['machine']}. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
        + f". jlora commit {report['commit'][:10]}, {report['date']}.", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Recall@1 vs rank (per target set and variant), vs trainable params, vs step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    by = {c["name"]: c for c in cells}
    zero, full = by["zero-shot"], by["full"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for a in axes:
        a.axhline(zero["recall_mean"], color="gray", ls="--", lw=1, label="zero-shot")
        a.axhline(full["recall_mean"], color="k", lw=1.2,
                  label=f"full fine-tuning (lr {full['lr']:g})")
        a.axhspan(full["recall_mean"] - full["recall_std"],
                  full["recall_mean"] + full["recall_std"], color="k", alpha=0.08)
    ranks = [c for c in cells if c["kind"] == "lora" and c["targets"] == "all linear"
             and c["variant"] == "LoRA"]
    ax.errorbar([c["rank"] for c in ranks], [c["recall_mean"] for c in ranks],
                [c["recall_std"] for c in ranks], marker="o", capsize=3,
                label="LoRA, all linear")
    others = [c for c in cells if c["kind"] == "lora" and c not in ranks]
    markers = "sD^vP<>"
    for k, c in enumerate(others):
        x = 8 * 1.055 ** (k + 1)  # side by side, right of rank 8
        name = c["label"].replace(" r=8", "")
        ax.errorbar([x], [c["recall_mean"]], [c["recall_std"]], marker=markers[k % 7],
                    capsize=3, ls="none", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([c["rank"] for c in ranks], [str(c["rank"]) for c in ranks])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("held-out recall@1")
    ax.set_title("recall@1 vs rank (mean ± std, 3 seeds)")
    ax.legend(fontsize=7, loc="lower right")
    trained = [c for c in cells if c["kind"] != "zero-shot"]
    for ax, key, xlabel, log in ((axes[1], "trainable_params", "trainable parameters", True),
                                 (axes[2], "step_seconds", "seconds per train step", False)):
        for c in trained:
            color = "k" if c["kind"] == "full" else "C0" if c in ranks else "C1"
            ax.errorbar([c[key]], [c["recall_mean"]], [c["recall_std"]], marker="o",
                        color=color, capsize=2, ls="none")
            short = c["name"].removeprefix("lora-")
            ax.annotate(short, (c[key], c["recall_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title(f"recall@1 vs {xlabel}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
