"""The files of a ``jlora finetune`` run directory besides checkpoints and exports.

``config.yaml`` (the run's full :class:`~jlora.cli.args.Finetune`, read back by ``--resume``
and ``jlora export``), ``metrics.jsonl`` (one JSON object per logged step or evaluation)
and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jlora.cli.args import Finetune
from jlora.errors import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CHECKPOINTS = "checkpoints"
SUMMARY_FILE = "summary.json"

# Fields a resumed run may change: they do not alter the batches or the updates it replays.
RESUMABLE_CHANGES = frozenset({
    "resume", "merged", "data.eval", "train.steps", "train.epochs", "train.eval_every",
    "train.eval_batch_size", "train.early_stopping", "train.save_every", "train.keep",
    "train.log_every",
})


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple | list):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    return x


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_config(out: Path, cfg: Finetune) -> Path:
    """Writes ``config.yaml``: every field of the run, so it can be resumed or exported."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    d = _plain(cfg)
    d["resume"] = False
    _write_atomic(path, yaml.safe_dump(d, sort_keys=False))
    return path


def load_run_config(out: str | os.PathLike) -> Finetune:
    """The :class:`Finetune` config a run directory was started with."""
    from jlora.cli.parse import parse

    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{str(out)!r} is not a jlora finetune run: it has no {CONFIG_FILE}.")
    return parse(["finetune", "--config", str(path)])


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("data", "lora", "optim", "train"):
            out.update(_flat(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def has_checkpoint(out: Path) -> bool:
    ckpts = out / CHECKPOINTS
    return ckpts.is_dir() and any(p.is_dir() and p.name.isdigit() for p in ckpts.iterdir())


def check_resumable(out: Path, cfg: Finetune) -> Finetune | None:
    """The saved config when ``cfg.resume``, after checking the run can go on; None for a
    new run, after checking ``out`` holds no run already."""
    if not cfg.resume:
        if (out / CONFIG_FILE).exists() or has_checkpoint(out):
            raise ConfigError(f"{str(out)!r} holds a finetune run already: pass --resume to "
                              "continue it, or choose another --out.")
        return None
    if not (out / CONFIG_FILE).is_file() or not has_checkpoint(out):
        raise ConfigError(f"--resume: {str(out)!r} holds no checkpoint to resume from; drop "
                          "--resume to start a new run there.")
    saved = load_run_config(out)
    a, b = _flat(_plain(saved)), _flat(_plain(cfg))
    diff = [f"{k}: {a.get(k)!r} in the run, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b)) if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    if diff:
        raise ConfigError(f"--resume: these options differ from the run in {str(out)!r}: "
                          + "; ".join(diff) + ". Resume with the run's options (see its "
                          f"{CONFIG_FILE}), or start a new run.")
    return saved


def write_summary(out: Path, result: dict[str, Any]) -> Path:
    """``summary.json``: what the run did (steps, losses, evaluations, best, seconds)."""
    keep = {k: v for k, v in result.items() if k != "losses"}
    _write_atomic(out / SUMMARY_FILE, json.dumps(keep, indent=2, default=float) + "\n")
    return out / SUMMARY_FILE


def read_metrics(out: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """The metrics lines of a run (those of steps ``<= upto``)."""
    path = out / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if upto is None or r.get("step", 0) <= upto]


def append_metrics(out: Path, entries: Iterable[dict[str, Any]], *, rewrite: bool = False) -> None:
    """Appends metrics lines (``rewrite``: the file holds exactly ``entries``)."""
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(e) + "\n" for e in entries)
    if rewrite:
        _write_atomic(out / METRICS_FILE, text)
    else:
        with open(out / METRICS_FILE, "a") as f:
            f.write(text)


def plot_curves(out: Path, history: list[dict[str, Any]], task: str) -> Path | None:
    """``curves.png``: the training loss and the held-out metrics against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return None
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    keys = ["eval_recall@1", "eval_mrr"] if task == "embedding" else ["eval_loss"]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 3.6),
                             squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    if evals:
        ax = axes[0][1]
        for key in keys:
            pts = [(h["step"], h[key]) for h in evals if key in h]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=key.removeprefix("eval_"))
        ax.set_xlabel("step")
        ax.set_ylabel("held-out")
        ax.legend()
    fig.suptitle(f"jlora finetune ({task}): {out.name}")
    fig.tight_layout()
    path = out / CURVES_FILE
    tmp = out / f".{CURVES_FILE}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
