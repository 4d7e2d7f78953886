"""Every user mistake ends with one line naming the problem and the fix, exit code 2, and
no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

import jlora
from jlora.cli import main


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith(("Writing", "Loading"))]
    assert len(err) == 1 and err[0].startswith("jlora: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def base(llama_dir, text_data, tmp_path):
    train, _ = text_data
    return ["finetune", "--model", str(llama_dir), "--out", str(tmp_path / "run"),
            "--data.train", str(train), "--train.steps", "1", "--train.batch-size", "8"]


def test_missing_model_dir(capsys, text_data, tmp_path):
    msg = one_line_error(capsys, ["finetune", "--model", str(tmp_path / "nope"), "--out",
                                  str(tmp_path / "run"), "--data.train", str(text_data[0])])
    assert "nope" in msg and "not a directory" in msg


def test_missing_data_file(capsys, base, tmp_path):
    msg = one_line_error(capsys, [*base, "--data.train", str(tmp_path / "absent.jsonl")])
    assert "absent.jsonl" in msg and "does not exist" in msg


def test_empty_data_file(capsys, base, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    msg = one_line_error(capsys, [*base, "--data.train", str(tmp_path / "empty.jsonl")])
    assert "empty.jsonl" in msg and "empty" in msg


def test_data_without_the_text_field(capsys, base, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "some words here"}\n')
    msg = one_line_error(capsys, [*base, "--data.train", str(tmp_path / "d.jsonl")])
    assert "d.jsonl:1" in msg and "'text'" in msg and "--data" in msg


def test_config_field_of_the_wrong_type(capsys, base, tmp_path):
    msg = one_line_error(capsys, [*base, "--lora.rank", "3.5"])
    assert "--lora.rank" in msg and "3.5" in msg and "--help" in msg
    (tmp_path / "c.yaml").write_text("lora:\n  rank: eight\n")
    msg = one_line_error(capsys, [*base, "--config", str(tmp_path / "c.yaml")])
    assert "--lora.rank" in msg and "eight" in msg
    (tmp_path / "b.yaml").write_text("lora:\n  rslora: 'no'\n")
    msg = one_line_error(capsys, [*base, "--config", str(tmp_path / "b.yaml")])
    assert "b.yaml" in msg and "rslora" in msg and "true or false" in msg


def test_unknown_config_field(capsys, base, tmp_path):
    msg = one_line_error(capsys, [*base, "--lora.rnk", "3"])
    assert "--lora.rnk" in msg and "--lora.rank" in msg
    (tmp_path / "c.yaml").write_text("lora:\n  rnk: 3\n")
    msg = one_line_error(capsys, [*base, "--config", str(tmp_path / "c.yaml")])
    assert "c.yaml" in msg and "lora.rnk" in msg and "lora.rank" in msg
    (tmp_path / "bad.yaml").write_text("lora: [1, 2\n")
    msg = one_line_error(capsys, [*base, "--config", str(tmp_path / "bad.yaml")])
    assert "bad.yaml" in msg and "does not parse" in msg


def test_impossible_values(capsys, base):
    msg = one_line_error(capsys, [*base, "--train.batch-size", "-2"])
    assert "--train.batch-size=-2" in msg
    msg = one_line_error(capsys, [*base, "--train.batch-size", "6"])
    assert "multiple of 8" in msg  # 8 simulated devices on 'data'
    msg = one_line_error(capsys, [*base, "--train.mesh", "data", "2", "model", "4"])
    assert "'model'" in msg


def test_resume_without_checkpoint(capsys, base):
    msg = one_line_error(capsys, [*base, "--resume"])
    assert "--resume" in msg and "no checkpoint" in msg


def test_task_the_model_cannot_do(capsys, base):
    msg = one_line_error(capsys, [*base, "--task", "embedding"])
    assert "llama" in msg and "--task causal-lm" in msg


def test_adapter_made_for_another_architecture(capsys, llama_dir, gpt2_dir, tmp_path):
    _, params, hf_config = jlora.hf.load(llama_dir)
    cfg = jlora.LoraConfig(rank=2, targets=["q_proj", "v_proj"])
    jlora.hf.save_peft(jlora.inject(params, cfg, jax.random.key(0)), cfg, tmp_path / "a",
                       hf_config=hf_config)
    msg = one_line_error(capsys, ["generate", "--model", str(gpt2_dir), "--adapter",
                                  str(tmp_path / "a"), "--prompt", "the"])
    assert "q_proj" in msg and "base model it was trained on" in msg


def test_export_needs_an_output(capsys, tmp_path):
    msg = one_line_error(capsys, ["export", str(tmp_path)])
    assert "--adapter" in msg and "--merged" in msg


def test_real_process_exit_code_and_stderr(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "-m", "jlora.cli", "info", str(tmp_path / "x")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "is not a directory" in proc.stderr
