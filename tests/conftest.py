"""Fixtures shared by the test packages: tiny transformers checkpoints and their editing;
tiny checkpoints with their own tokenizers, and data files, for the CLI."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from jlora.hf.io import SINGLE_FILE, iter_tensors, write_safetensors


@pytest.fixture(scope="session")
def save_hf():
    """``save_hf(config, path, model_class=AutoModelForCausalLM, seed=0, **kw)``.

    Seeds torch, builds the transformers model (``model_class.from_config(config, **kw)`` for
    an Auto class, else ``model_class(config)``), saves it to ``path`` and returns it in eval
    mode. ``save_kw`` goes to ``save_pretrained``.
    """
    import torch
    import transformers as tf

    def save(config, path, model_class=tf.AutoModelForCausalLM, seed=0, save_kw=None, **kw):
        torch.manual_seed(seed)
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(config, **kw)
        else:
            model = model_class(config, **kw)
        model = model.eval()
        model.save_pretrained(path, **(save_kw or {}))
        return model

    return save


@pytest.fixture(scope="session")
def train_adapters():
    """``train_adapters(params, config, fwd, steps=3) -> (trained, fwd(trained))``: injects
    ``config`` and takes a few Adam steps on a regression of ``fwd(params)`` (the adapted
    forward) towards random targets, so that B, DoRA's magnitudes and the trainable copies all
    move. One jit for all of it: compiling is most of the cost on a small CPU."""
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    def train(params, config, fwd, steps=3):
        @jax.jit
        def run(params):
            params = jlora.inject(params, config, jax.random.key(1))
            tx = jlora.optimizer(optax.adam(1e-2), params)
            target = jax.random.normal(jax.random.key(2), jax.eval_shape(fwd, params).shape)
            loss_fn = lambda p: jnp.mean((fwd(p) - target) ** 2)  # noqa: E731

            def step(_, carry):
                params, state = carry
                updates, state = tx.update(jax.grad(loss_fn)(params), state, params)
                return optax.apply_updates(params, updates), state

            params, _ = jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))
            return params, fwd(params)

        return run(params)

    return train


@pytest.fixture(scope="session")
def peft_messages():
    """``with peft_messages() as messages:`` collects every warning and every peft /
    transformers log record of level WARNING or above raised inside the block.

    One kind is left out, as pyproject's filterwarnings leaves it out: a FutureWarning or
    DeprecationWarning raised from transformers' own code (peft 0.21 reads transformers 5's
    deprecated ``is_gradient_checkpointing`` on every ``PeftModel`` it builds, whatever the
    adapter); it says nothing about the adapter loaded.
    """
    import contextlib
    import logging
    import os
    import warnings

    import transformers

    library = os.path.dirname(transformers.__file__) + os.sep

    def about_the_adapter(w) -> bool:
        return not (issubclass(w.category, FutureWarning | DeprecationWarning)
                    and w.filename.startswith(library))

    @contextlib.contextmanager
    def capture():
        records: list[str] = []

        class Handler(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        handler = Handler(logging.WARNING)
        loggers = [logging.getLogger(n) for n in ("peft", "transformers")]
        for lg in loggers:
            lg.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield records
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
        records += [f"{w.category.__name__}: {w.message}" for w in caught
                    if about_the_adapter(w)]

    return capture


@pytest.fixture(scope="session")
def rewrite_weights():
    """``rewrite_weights(path, fn)``: model.safetensors := ``fn(dict of its tensors)``."""

    def rewrite(path, fn):
        tensors = dict(iter_tensors(path))
        write_safetensors(path / SINGLE_FILE, fn(tensors))

    return rewrite


@pytest.fixture(scope="session")
def edit_config():
    """``edit_config(path, fn)``: config.json := ``fn(its dict)``."""

    def edit(path, fn):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(fn(config)))

    return edit


@pytest.fixture(scope="session")
def check_name_map_round_trip():
    """``check(spec, path)``: the saved tensors map to params and back to themselves."""
    from safetensors.numpy import load_file

    def check(spec, path):
        hf_config = json.loads((path / "config.json").read_text())
        saved = load_file(path / "model.safetensors")
        assert set(saved) == spec.expected_hf_keys(hf_config)
        back = {}
        for name, array in saved.items():
            p, a = spec.hf_to_params(name, array)
            back.update(dict(spec.params_to_hf(p, a)))
        assert set(back) == set(saved)
        for k in saved:
            np.testing.assert_array_equal(back[k], saved[k])

    return check


WORDS = re.compile(r"[a-z]+")


def corpus() -> list[str]:
    """Sentences of plain English from the standard library's documentation topics."""
    import pydoc_data.topics

    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40])
    sentences = [" ".join(WORDS.findall(s.lower())) for s in re.split(r"[.\n]", text)]
    return [s for s in sentences if len(s.split()) >= 4]


def make_tokenizer(path, vocab_size: int, *, bert: bool = False):
    """A word-level fast tokenizer over the corpus' most common words, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if bert else ["<pad>", "<unk>", "<s>", "</s>"]
    counts = collections.Counter(w for s in corpus() for w in s.split())
    words = [w for w, _ in counts.most_common(vocab_size - len(special))]
    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                       unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                       model_input_names=["input_ids", "token_type_ids",
                                                          "attention_mask"])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                       unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, save_hf):
    import transformers as tf

    path = tmp_path_factory.mktemp("llama")
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    save_hf(cfg, path)
    make_tokenizer(path, 128)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, save_hf):
    import transformers as tf

    path = tmp_path_factory.mktemp("gpt2")
    cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=2, eos_token_id=3)
    save_hf(cfg, path)
    make_tokenizer(path, 128)
    return path


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, save_hf):
    import transformers as tf

    path = tmp_path_factory.mktemp("bert")
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64)
    save_hf(cfg, path, model_class=tf.AutoModel)
    make_tokenizer(path, 128, bert=True)
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory):
    """``(train.jsonl, eval.jsonl)`` of sentences, plus prompt/completion fields."""
    path = tmp_path_factory.mktemp("text")
    sentences = corpus()
    recs = [{"text": s, "prompt": " ".join(s.split()[:3]), "completion": " ".join(s.split()[3:])}
            for s in sentences]
    train, held = recs[:160], recs[160:200]
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path / "train.jsonl", path / "eval.jsonl"


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory):
    """``(train.jsonl, eval.jsonl)`` of query/document pairs: a sentence's first words and
    the rest of it."""
    path = tmp_path_factory.mktemp("pairs")
    recs = [{"query": " ".join(s.split()[:4]), "document": " ".join(s.split()[4:]) or s}
            for s in corpus()]
    for name, rows in (("train.jsonl", recs[:128]), ("eval.jsonl", recs[128:176])):
        (path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path / "train.jsonl", path / "eval.jsonl"
