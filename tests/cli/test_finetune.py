"""`jlora finetune` -> `jlora export` -> `jlora generate`, end to end on tiny models."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jlora
from jlora.cli import main
from jlora.cli.args import Finetune
from jlora.cli.finetune import finetune
from jlora.cli.parse import parse


def finetune_args(model, out, train, held, *extra, steps=6):
    return ["finetune", "--model", str(model), "--out", str(out), "--data.train", str(train),
            "--data.eval", str(held), "--data.max-length", "32", "--train.batch-size", "8",
            "--train.steps", str(steps), "--train.eval-every", "3", "--train.save-every", "3",
            "--optim.lr", "1e-2", "--optim.warmup-steps", "1", "--lora.rank", "4", *extra]


def losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def generations(capsys, *argv):
    assert main(["generate", *map(str, argv), "--prompt", "the simple form",
                 "assert statements are", "--max-new-tokens", "6"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_finetune_export_generate(kind, request, text_data, tmp_path, capsys):
    model_dir = request.getfixturevalue(f"{kind}_dir")
    out = tmp_path / "run"
    extra = [] if kind == "llama" else ["--data.no-packing", "--data.prompt-field", "prompt",
                                        "--train.accum-steps", "2",
                                        "--train.mesh", "data", "2", "fsdp", "2", "tensor", "2"]
    assert main(finetune_args(model_dir, out, *text_data, *extra)) == 0
    log = capsys.readouterr().out
    assert "perplexity" in log and "trainable params" in log
    got = losses(out)
    assert len(got) == 6 and got[-1] < got[0]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "curves.png").is_file()
    assert main(["export", str(out), "--adapter", str(tmp_path / "a"),
                 "--merged", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    with_adapter = generations(capsys, "--model", model_dir, "--adapter", tmp_path / "a")
    merged = generations(capsys, "--model", tmp_path / "m")
    assert [g["prompt"] for g in with_adapter] == ["the simple form", "assert statements are"]
    assert with_adapter == merged


@pytest.mark.slow
def test_resume_after_sigkill_replays_the_uninterrupted_run(llama_dir, text_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = lambda out: finetune_args(llama_dir, out, *text_data, "--lora.dropout", "0.1",  # noqa: E731
                                     "--train.save-every", "2", steps=8)
    finetune(parse(args(whole)), progress=False)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.Popen([sys.executable, "-m", "jlora.cli", *args(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "2").is_dir() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "adapter").exists() or len(losses(cut)) < 8  # killed mid-run
    assert main([*args(cut), "--resume"]) == 0
    np.testing.assert_array_equal(losses(cut), losses(whole))
    a = jlora.hf.load_peft(jlora.hf.load(llama_dir)[1], whole / "adapter")[0]
    b = jlora.hf.load_peft(jlora.hf.load(llama_dir)[1], cut / "adapter")[0]
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_config_file_with_flag_override(llama_dir, text_data, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        f"model: {llama_dir}\nout: {tmp_path / 'run'}\n"
        f"data:\n  train: [{text_data[0]}]\n  max_length: 16\n"
        "lora:\n  rank: 2\n  targets: [q_proj, v_proj]\n  rslora: true\n"
        "  rank_pattern: {v_proj: 3}\n"
        "train:\n  batch_size: 8\n  mesh: {data: 2, fsdp: 2}\n")
    cfg = parse(["finetune", "--config", str(cfg_file), "--lora.rank", "5"])
    assert isinstance(cfg, Finetune)
    assert cfg.lora.rank == 5 and cfg.lora.rslora and cfg.lora.targets == ("q_proj", "v_proj")
    assert cfg.lora.rank_pattern == {"v_proj": 3} and cfg.train.mesh == {"data": 2, "fsdp": 2}
    assert cfg.data.max_length == 16 and cfg.train.batch_size == 8
    lc = cfg.lora.to_config()
    assert lc.use_rslora and lc.rank == 5 and lc.targets == ("q_proj", "v_proj")


def test_early_stopping(llama_dir, text_data, tmp_path):
    out = tmp_path / "run"
    r = finetune(parse(finetune_args(llama_dir, out, *text_data, "--train.eval-every", "1",
                                     "--train.early-stopping", "2", "--optim.lr", "1e-30",
                                     steps=8)), progress=False)
    assert r["stopped"] == "early stopping at step 2" and r["steps"] == 2
    assert [e["step"] for e in r["evals"]] == [0, 1, 2] and r["best"]["step"] == 0
    assert json.loads((out / "summary.json").read_text())["stopped"].startswith("early")
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_full_fine_tuning(llama_dir, text_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(finetune_args(llama_dir, out, *text_data, "--full", "--optim.lr", "3e-3",
                              steps=4)) == 0
    assert "full fine-tuning: 26,784 trainable params" in capsys.readouterr().out
    got = losses(out)
    assert len(got) == 4 and got[-1] < got[0]
    assert not (out / "adapter").exists()
    _, tuned, _ = jlora.hf.load(out / "model")  # the best evaluation's model
    _, base, _ = jlora.hf.load(llama_dir)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), tuned, base)
    assert all(jax.tree.leaves(changed))  # every weight trained
    assert main(["export", str(out), "--adapter", str(tmp_path / "a")]) == 2
    assert "full fine-tuning run" in capsys.readouterr().err
