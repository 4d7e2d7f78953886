"""jlora.hf.load on checkpoint variants: default tying, prefixes, optional tensors, memory."""

import logging
import shutil
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers as tf

from jlora.errors import HFError
from jlora.hf.io import SINGLE_FILE, checkpoint_index, iter_tensors, write_safetensors
from jlora.hf.load import load
from jlora.models.bert import SPEC as BERT

IDS = np.array([[3, 7, 1, 9, 4, 2]])
BERT_TINY = dict(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=24,
    max_position_embeddings=16,
)


def _without_tie_key(config):
    config.pop("tie_word_embeddings", None)
    return config


def _logits(torch_model):
    with torch.no_grad():
        return torch_model(torch.tensor(IDS)).logits.numpy()


# ------------------------------------------------------------ tie_word_embeddings default


@pytest.fixture
def gpt2_no_tie_key(tmp_path, save_hf, edit_config):
    """A GPT-2 checkpoint whose config.json lacks tie_word_embeddings (GPT2Config: True)."""
    cfg = tf.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    save_hf(cfg, tmp_path, tf.GPT2LMHeadModel)
    edit_config(tmp_path, _without_tie_key)
    return tmp_path


def test_gpt2_without_tie_key_ties_as_transformers_does(gpt2_no_tie_key, caplog, rewrite_weights):
    path = gpt2_no_tie_key
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    assert ref.config.tie_word_embeddings is True
    want = _logits(ref)  # before rewriting the file transformers may have memory-mapped
    for stored_head in (False, True):  # a tied head stored anyway (equal) is ignored
        if stored_head:
            rewrite_weights(path, lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"]})
            assert "lm_head.weight" in checkpoint_index(path)
        with caplog.at_level(logging.WARNING, logger="jlora.hf.load"):
            model, params, hf_config = load(path)
        assert not [r for r in caplog.records if r.name == "jlora.hf.load"]
        assert "tie_word_embeddings" not in hf_config
        assert model.config.tie_word_embeddings and "lm_head" not in params["params"]
        np.testing.assert_allclose(model.apply(params, IDS), want, atol=1e-4)


def test_gpt2_without_tie_key_and_a_different_head_unties_as_transformers_does(
    gpt2_no_tie_key, caplog, rewrite_weights
):
    """transformers 5 does not tie a stored head that differs from wte: neither does jlora."""
    path = gpt2_no_tie_key
    head = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
    rewrite_weights(path, lambda t: {**t, "lm_head.weight": head})
    ref = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    np.testing.assert_array_equal(ref.lm_head.weight.detach().numpy(), head)
    with caplog.at_level(logging.WARNING, logger="jlora.hf.load"):
        model, params, hf_config = load(path)
    logged = [r.getMessage() for r in caplog.records if r.name == "jlora.hf.load"]
    assert len(logged) == 1 and "untied" in logged[0] and "unset, default true" in logged[0]
    assert hf_config["tie_word_embeddings"] is False and not model.config.tie_word_embeddings
    np.testing.assert_array_equal(params["params"]["lm_head"]["kernel"], head.T)
    np.testing.assert_allclose(model.apply(params, IDS), _logits(ref), atol=1e-4)

    rewrite_weights(path, lambda t: {**t, "lm_head.weight": np.zeros((41, 16), np.float32)})
    with pytest.raises(HFError, match=r"'lm_head.weight' has shape \(41, 16\)"):
        load(path)


def test_gpt2_explicitly_untied_loads_its_head(tmp_path, save_hf):
    cfg = tf.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, tie_word_embeddings=False
    )
    save_hf(cfg, tmp_path, tf.GPT2LMHeadModel)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model, params, _ = load(tmp_path)
    assert "lm_head" in params["params"]
    np.testing.assert_allclose(model.apply(params, IDS), _logits(ref), atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_decoder_without_tie_key_is_untied_as_in_transformers(
    kind, tmp_path, save_hf, rewrite_weights, edit_config
):
    """LlamaConfig / Qwen2Config default tie_word_embeddings to False: lm_head is required."""
    config_class = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[kind]
    cfg = config_class(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    save_hf(cfg, tmp_path)
    edit_config(tmp_path, _without_tie_key)
    ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.tie_word_embeddings is False
    model, params, _ = load(tmp_path)
    assert "lm_head" in params["params"]
    np.testing.assert_allclose(model.apply(params, IDS), _logits(ref), atol=1e-4)

    rewrite_weights(tmp_path, lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(HFError, match=r"missing tensors: 'lm_head.weight'"):
        load(tmp_path)


# ---------------------------------------------------------------------- prefixed names


def test_gpt2_without_transformer_prefix(tmp_path, save_hf):
    cfg = tf.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    save_hf(cfg, tmp_path / "a", tf.GPT2LMHeadModel)
    model, want, _ = load(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    tensors = {n.removeprefix("transformer."): a for n, a in iter_tensors(tmp_path / "a")}
    assert "h.0.attn.c_attn.weight" in tensors
    write_safetensors(tmp_path / "b" / SINGLE_FILE, tensors)
    _, got, _ = load(tmp_path / "b")
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory, save_hf):
    """A BertForMaskedLM checkpoint: ``bert.``-prefixed names, ``cls.*`` head, no pooler."""
    path = tmp_path_factory.mktemp("bert_mlm")
    save_hf(tf.BertConfig(**BERT_TINY), path, tf.BertForMaskedLM)
    return path


def _bert_ref(path):
    ids = torch.tensor(IDS)
    with torch.no_grad():
        return tf.AutoModel.from_pretrained(path).eval()(input_ids=ids, attention_mask=ids > -1)


def test_bert_masked_lm_checkpoint_loads_with_pooler_initialised(masked_lm, caplog):
    names = set(checkpoint_index(masked_lm))
    assert "bert.encoder.layer.0.attention.self.query.weight" in names
    assert any(n.startswith("cls.") for n in names)
    assert not any("pooler" in n for n in names)

    with caplog.at_level(logging.WARNING, logger="jlora.hf.load"):
        model, params, hf_config = load(masked_lm)
    logged = [r.getMessage() for r in caplog.records if r.name == "jlora.hf.load"]
    assert len(logged) == 1
    assert "'pooler.dense.bias', 'pooler.dense.weight'" in logged[0]
    assert "jax.random.key(0)" in logged[0]

    ref = _bert_ref(masked_lm)
    out = model.apply(params, IDS)
    hidden = np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max()
    assert hidden <= 1e-4  # the pooler is random in both, so only the hidden states compare

    # the pooler is what model.init gives with the fixed key, in the param dtype
    init = model.init(jax.random.key(0), *BERT.example_inputs(hf_config))["params"]["pooler"]
    jax.tree.map(np.testing.assert_array_equal, params["params"]["pooler"], init)
    shapes = jax.eval_shape(model.init, jax.random.key(0), *BERT.example_inputs(hf_config))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), shapes
    )


def test_bert_sequence_classification_checkpoint_matches_automodel(tmp_path, caplog, save_hf):
    """``bert.`` prefix and a ``classifier`` head; the pooler is stored and compared too."""
    save_hf(tf.BertConfig(**BERT_TINY, num_labels=3), tmp_path, tf.BertForSequenceClassification)
    assert "bert.pooler.dense.weight" in checkpoint_index(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jlora.hf.load"):
        model, params, _ = load(tmp_path)
    assert not [r for r in caplog.records if r.name == "jlora.hf.load"]
    ref = _bert_ref(tmp_path)
    out = model.apply(params, IDS)
    assert np.abs(np.asarray(out.last_hidden_state) - ref.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


@pytest.fixture
def edited(masked_lm, tmp_path, rewrite_weights):
    """``edited(name, fn)``: a copy of ``masked_lm`` whose tensors are ``fn(its tensors)``."""

    def edit(name, fn):
        rewrite_weights(shutil.copytree(masked_lm, tmp_path / name), fn)
        return tmp_path / name

    return edit


def test_prefixed_errors_use_canonical_names(edited):
    def drop_one(t):
        t.pop("bert.encoder.layer.1.output.dense.weight")
        t["bert.encoder.layer.0.extra.weight"] = np.zeros((2, 2), np.float32)
        return t

    path = edited("missing", drop_one)
    with pytest.raises(HFError) as info:
        load(path)
    msg = str(info.value)
    assert "missing tensors: 'encoder.layer.1.output.dense.weight'" in msg
    assert "unexpected tensors: 'bert.encoder.layer.0.extra.weight'" in msg
    assert "pooler" not in msg  # optional: initialised, not an error

    def both_names(t):
        t["encoder.layer.0.output.dense.bias"] = t["bert.encoder.layer.0.output.dense.bias"]
        return t

    path = edited("twice", both_names)
    with pytest.raises(HFError, match=r"tensors for the same param: .*"
                       r"'encoder.layer.0.output.dense.bias'"):  # fmt: skip
        load(path)

    def bad_shape(t):
        t["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((20, 16), np.float32)
        return t

    path = edited("shape", bad_shape)
    with pytest.raises(HFError, match=r"'bert.encoder.layer.0.intermediate.dense.weight' has "
                       r"shape \(20, 16\).*implies \(24, 16\)"):  # fmt: skip
        load(path)


def test_non_optional_missing_stays_an_error_on_bert(edited):
    def drop(t):
        t.pop("bert.embeddings.LayerNorm.weight")
        return t

    path = edited("c", drop)
    with pytest.raises(HFError, match=r"missing tensors: 'embeddings.LayerNorm.weight'$"):
        load(path)


# ------------------------------------------------------------------------------- memory


def test_load_holds_one_copy_of_the_weights(tmp_path, save_hf):
    """Host memory (numpy, traced) during load stays near one tensor, not the whole model."""
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    save_hf(cfg, tmp_path)
    infos = checkpoint_index(tmp_path).values()
    total = sum(i.end - i.start for i in infos)
    largest = max(i.end - i.start for i in infos)
    assert total > 15 * largest
    load(tmp_path)  # warm caches (tracing, imports) outside the measurement
    tracemalloc.start()
    try:
        _, params, _ = load(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * largest, (peak, largest, total)
    assert sum(x.nbytes for x in jax.tree.leaves(params)) == total
