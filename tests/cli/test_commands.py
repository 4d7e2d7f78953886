"""The exports of the CLI against the real references (peft, transformers,
sentence-transformers), and plan / info / help."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest

import jlora
from jlora.cli import main
from jlora.cli.args import COMMANDS
from jlora.cli.finetune import finetune
from jlora.cli.parse import parse
from jlora.cli.runfiles import load_run_config


@pytest.fixture(scope="module")
def llama_run(llama_dir, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_run") / "run"
    train, held = text_data
    finetune(parse(["finetune", "--model", str(llama_dir), "--out", str(out),
                    "--data.train", str(train), "--data.eval", str(held),
                    "--data.max-length", "32", "--train.batch-size", "8", "--train.steps", "4",
                    "--train.save-every", "4", "--optim.lr", "2e-2", "--lora.rank", "4",
                    "--lora.targets", "q_proj", "v_proj", "down_proj", "--merged"]),
             progress=False)
    return out


@pytest.fixture(scope="module")
def bert_run(bert_dir, pair_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bert_run") / "run"
    train, held = pair_data
    result = finetune(parse(["finetune", "--model", str(bert_dir), "--out", str(out),
                             "--task", "embedding", "--data.train", str(train),
                             "--data.eval", str(held), "--data.max-length", "16",
                             "--train.batch-size", "16", "--train.steps", "6",
                             "--train.eval-every", "3", "--optim.lr", "2e-2",
                             "--lora.targets", "query", "value", "dense"]),
                      progress=False)
    return out, result


def test_exported_adapter_matches_peft_logits(llama_run):
    import torch
    import transformers as tf
    from peft import PeftModel

    base_dir = load_run_config(llama_run).model
    model, params, _ = jlora.hf.load(base_dir)
    adapted, cfg = jlora.hf.load_peft(params, llama_run / "adapter")
    b = adapted["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_b"]
    assert float(np.abs(np.asarray(b)).max()) > 0  # trained: not the identity adapter
    ids = np.array([[2, 5, 9, 14, 7, 30, 11, 4]], np.int32)
    ours = np.asarray(jlora.lora(model.apply)(adapted, ids))
    base = tf.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, llama_run / "adapter").eval()(
            torch.tensor(ids, dtype=torch.long)).logits.numpy()
        merged = tf.AutoModelForCausalLM.from_pretrained(llama_run / "merged").eval()(
            torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    np.testing.assert_allclose(merged, theirs, atol=1e-4)


def test_embed_with_adapter_equals_sentence_transformers_peft(bert_run, bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    run, result = bert_run
    evals = result["evals"]
    assert evals[0]["step"] == 0 and "eval_recall@1" in evals[-1] and "eval_mrr" in evals[-1]
    sentences = ["the simple form assert expression", "for loops run over a sequence",
                 "a class defines new objects"]
    (tmp_path / "s.txt").write_text("\n".join(sentences))
    adapter = tmp_path / "adapter"  # the last step's (the best evaluation may be step 0)
    assert main(["export", str(run), "--adapter", str(adapter)]) == 0
    assert main(["embed", "--model", str(bert_dir), "--adapter", str(adapter),
                 "--input", str(tmp_path / "s.txt"), "--out", str(tmp_path / "e.npy"),
                 "--max-length", "16"]) == 0
    ours = np.load(tmp_path / "e.npy")
    word = Transformer(str(bert_dir), max_seq_length=16)
    st = SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), "mean"),
                                      Normalize()], device="cpu")
    plain = st.encode(sentences, convert_to_numpy=True)
    st.load_adapter(str(adapter))
    theirs = st.encode(sentences, convert_to_numpy=True)
    assert np.abs(plain - theirs).max() > 1e-3  # the adapter changes the embeddings
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_plan_reads_headers_only(llama_dir, capsys, monkeypatch):
    import jlora.hf.io as io

    def no_reads(*a, **k):
        raise AssertionError("plan read a tensor")

    monkeypatch.setattr(io, "read_tensor", no_reads)
    assert main(["plan", "--model", str(llama_dir), "--lora.targets", "q_proj", "v_proj",
                 "--lora.rank-pattern", "v_proj", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.kernel" in out and "4 adapted kernels" in out


def test_info(llama_run, llama_dir, capsys):
    for path in (llama_run, llama_run / "adapter", llama_dir, llama_run / "checkpoints"):
        assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "finetune run (causal-lm)" in out and "checkpoints at steps [4]" in out
    assert "PEFT adapter" in out and "r 4, lora_alpha 16" in out
    assert "model_type 'llama'" in out and "parameters" in out


def test_help_lists_commands_and_documents_every_option(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(name in top for name in COMMANDS)
    for name, cls in COMMANDS.items():
        assert main([name, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())

        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            kind = hints[field.name]
            names = ([f"{field.name}.{g.name}" for g in dataclasses.fields(kind)]
                     if dataclasses.is_dataclass(kind) else [field.name])
            for n in names:
                flag = n.replace("_", "-")
                assert flag.upper() in text or f"--{flag}" in text, (name, flag)
