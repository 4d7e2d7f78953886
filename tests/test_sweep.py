"""experiments/sweep_minilm.py: the cells are the spec's, and a cell rerun with the same seed
gives the same numbers (on the tiny BERT, a few steps)."""

import json

import jax

from experiments import sweep_minilm as S
from jlora.cli.parse import parse
from jlora.demo import RECIPE


def test_cells_are_the_spec():
    cells = S.cells()
    assert len({c.name for c in cells}) == len(cells)
    got = [(c.kind, c.rank, c.targets, c.variant) for c in cells]
    want = {("zero-shot", None, None, None), ("full", None, None, None)}
    want |= {("lora", r, "all linear", "LoRA") for r in (1, 2, 4, 8, 16, 64)}
    want |= {("lora", 8, t, "LoRA") for t in ("q,v", "all attention", "all linear")}
    want |= {("lora", 8, "all linear", v) for v in ("rsLoRA", "LoRA+", "PiSSA", "OLoRA")}
    assert len(got) == len(want) and set(got) == want
    assert S.SEEDS == (0, 1, 2)


def test_cell_command_lines(tmp_path):
    """Each cell changes only its own settings of the demo's recipe."""
    ctx = {"model": "m", "data": (tmp_path / "t.jsonl", tmp_path / "e.jsonl"),
           "steps": RECIPE["steps"], "batch_size": RECIPE["batch_size"]}
    base = parse(S.cell_argv(ctx, S.Cell("zero-shot", "zero-shot"), 0, tmp_path / "r"))
    assert base.lora.rank == RECIPE["rank"] and base.lora.alpha == RECIPE["alpha"]
    assert base.lora.targets == RECIPE["targets"] and base.train.seed == 0
    targets = {"q,v": ("query", "value"),
               "all attention": ("query", "key", "value", "attention.output.dense"),
               "all linear": RECIPE["targets"]}
    for cell in S.cells():
        cfg = parse(S.cell_argv(ctx, cell, 2, tmp_path / "r", full_lr=3e-5))
        assert cfg.train.seed == 2
        assert (cfg.train.steps, cfg.train.batch_size, cfg.data.max_length) == (
            RECIPE["steps"], RECIPE["batch_size"], RECIPE["max_length"])
        assert cfg.full == (cell.kind == "full")
        assert cfg.optim.lr == (3e-5 if cell.kind == "full" else RECIPE["lr"])
        if cell.kind != "lora":
            continue
        assert cfg.lora.rank == cell.rank and cfg.lora.alpha == RECIPE["alpha"]
        assert cfg.lora.targets == targets[cell.targets]
        assert cfg.lora.rslora == (cell.variant == "rsLoRA")
        assert cfg.optim.lora_plus_ratio == (16 if cell.variant == "LoRA+" else None)
        assert cfg.lora.init == {"PiSSA": "pissa", "OLoRA": "olora"}.get(cell.variant,
                                                                            "default")


def test_a_cell_reruns_to_the_same_numbers(tmp_path, bert_dir, pair_data, monkeypatch):
    argv = ["--only", "lora-r8", "--seed", "1", "--model", str(bert_dir), "--data",
            *map(str, pair_data), "--steps", "4", "--batch-size", "8",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "results")]
    first = S.main(argv)
    (run,) = first["runs"]
    assert run["seed"] == 1 and len(run["losses"]) == 4 and run["step_seconds"] > 0
    assert first["trainable_params"] > 0 and first["memory"]["temp"] > 0
    assert "reproduces_stored" not in first  # nothing stored yet
    # store it as a sweep's results: the rerun compares itself with them
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "sweep_minilm.json").write_text(
        json.dumps({"cells": [first], "full_lr_grid": {"lr": 1e-4}}))
    second = S.main(argv)
    assert second["reproduces_stored"] is True
    for key in ("after", "before", "losses"):
        assert second["runs"][0][key] == run[key], key
    assert second["memory"] == first["memory"]
    assert second["trainable_params"] == first["trainable_params"]
    assert jax.config.jax_compilation_cache_dir is None  # the sweep's cache is switched off
    # --retime measures the stored cells' steps again and rewrites the table (rendered by
    # test_report_renders; a one-cell sweep has no zero-shot or full row to draw)
    import experiments.sweep_report as R

    monkeypatch.setattr(R, "markdown", lambda report: json.dumps(report["retimed"]))
    monkeypatch.setattr(R, "plot", lambda report, path: path.write_text("png"))
    retimed = S.main([*argv[4:], "--retime"])
    (cell,) = retimed["cells"]
    assert len(cell["step_seconds_retimed"]) == 10 and cell["step_seconds"] > 0
    assert cell["step_seconds_in_runs"] == run["step_seconds"]
    assert retimed["retimed"]["order"] == ["lora-r8"]
    assert json.loads((tmp_path / "results" / "sweep_minilm.md").read_text())["steps"] == 10
    stored = json.loads((tmp_path / "results" / "sweep_minilm.json").read_text())
    assert stored["cells"][0]["step_seconds"] == cell["step_seconds"]


def test_report_renders(tmp_path):
    """The table and the plot of a (synthetic) sweep."""
    from experiments.sweep_report import markdown, plot

    def run(seed, recall):
        m = {"eval_recall@1": recall, "eval_mrr": recall + 0.1}
        return {"seed": seed, "before": {"eval_recall@1": 0.4, "eval_mrr": 0.5}, "after": m}

    records = []
    for k, c in enumerate(S.cells()):
        runs = [run(s, 0.4 + 0.01 * k + 0.002 * s) for s in S.SEEDS]
        rec = {"name": c.name, "label": c.label, "kind": c.kind, "rank": c.rank,
               "targets": c.targets, "variant": c.variant, "runs": runs,
               "trainable_params": 0 if c.kind == "zero-shot" else 1000 * (k + 1),
               **S.aggregate([{**r, "step_seconds": None if c.kind == "zero-shot" else 1.0}
                              for r in runs])}
        if c.kind != "zero-shot":
            rec["memory"] = {"temp": 2**30, "argument": 2**27}
        if c.kind == "full":
            rec["lr"] = 1e-4
        records.append(rec)
    report = {"recipe": RECIPE, "data": {"train": 10, "test": 5, "test_packages": ["a"],
                                         "validation": {"train": 8, "eval": 2}},
              "seeds": list(S.SEEDS), "cells": records,
              "full_lr_grid": {"lr": 1e-4, "runs": [{"lr": 1e-4, "recall@1": 0.5, "mrr": 0.6}]},
              "wall_seconds": 60.0, "cpu_seconds": 100.0, "versions": {"jax": "x"},
              "machine": "m", "commit": "0" * 40, "date": "today"}
    text = markdown(report)
    assert text.count("\n| ") == len(records) + 1 + 2  # the cells, the grid (header excluded)
    assert "| LoRA r=64, all linear | 8,000 | 0.472 ± 0.002 | +0.060 |" in text
    plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    report["retimed"] = {"warmup": 3, "steps": 10}
    assert "10 train steps (after 3 warm-up steps)" in markdown(report)
