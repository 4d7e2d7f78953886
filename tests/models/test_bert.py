"""BERT parity with transformers' BertModel, param names and the name map."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jlora
from jlora.hf.load import load
from jlora.hf.merged import save_merged
from jlora.models.bert import SPEC, BertConfig, BertModel

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=32,
    type_vocab_size=2,
)


def _paths(tree):
    return {p for p, _ in jlora.paths.leaves_with_paths(tree)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_hf):
    path = tmp_path_factory.mktemp("bert")
    return save_hf(transformers.BertConfig(**TINY), path, transformers.BertModel), path


def test_outputs_match_transformers_with_padding_and_token_types(tiny):
    hf, path = tiny
    model, params, _ = load(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY["vocab_size"], (3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    types = np.zeros((3, 11), np.int64)
    types[:, 5:] = 1
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
        )
    out = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    keep = mask.astype(bool)
    hidden = np.asarray(out.last_hidden_state)
    assert np.abs(hidden[keep] - ref.last_hidden_state.numpy()[keep]).max() <= 1e-4
    assert np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


def test_param_paths_equal_transformers_module_names(tiny):
    hf, path = tiny
    model, params, hf_config = load(path)
    init = jax.eval_shape(model.init, jax.random.key(0), *SPEC.example_inputs(hf_config))
    jl = {p.rsplit(".", 1)[0] for p in _paths(init["params"])}
    assert jl <= {n for n, _ in hf.named_modules()}
    assert jl == {n.rsplit(".", 1)[0] for n, _ in hf.named_parameters()}
    assert "encoder.layer.1.attention.self.query" in jl
    assert "embeddings.LayerNorm" in jl
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(params) == shapes(init)


def test_name_map_round_trip(tiny, check_name_map_round_trip):
    check_name_map_round_trip(SPEC, tiny[1])


def test_name_map_prefix_heads_and_buffers():
    w = np.arange(6.0).reshape(2, 3)
    path, a = SPEC.hf_to_params("bert.encoder.layer.0.attention.self.query.weight", w)
    assert path == ("encoder", "layer", "0", "attention", "self", "query", "kernel")
    np.testing.assert_array_equal(a, w.T)
    path, _ = SPEC.hf_to_params("bert.embeddings.LayerNorm.gamma", np.ones(3))
    assert path == ("embeddings", "LayerNorm", "scale")
    for name in (
        "embeddings.position_ids",
        "bert.embeddings.token_type_ids",
        "cls.predictions.bias",
        "classifier.weight",
    ):
        assert SPEC.hf_to_params(name, np.zeros(2)) is None


def test_lora_merge_and_save_merged_load_in_transformers(tiny, tmp_path):
    """An adapted BERT exports (merged) to what AutoModel reads, with the same outputs."""
    _, path = tiny
    model, params, hf_config = load(path)
    config = jlora.LoraConfig(rank=2, alpha=4, targets=["query", "value"], init="random")
    adapted = jlora.inject(params, config, jax.random.key(0))
    adapted = jax.tree_util.tree_map_with_path(  # non-zero B: the adapters change the output
        lambda kp, x: x + 0.1 if kp[-1].key.endswith("_lora_b") else x, adapted
    )
    ids = jnp.asarray([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    out = jlora.lora(model.apply)(adapted, ids, mask)
    merged = jlora.merge(adapted, unload=True)
    np.testing.assert_allclose(
        out.pooler_output, model.apply(merged, ids, mask).pooler_output, atol=1e-5
    )
    save_merged(model, merged, hf_config, tmp_path / "merged")
    back = getattr(transformers, SPEC.auto_class).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref = back(torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)))
    keep = np.asarray(mask, bool)
    hidden = np.asarray(out.last_hidden_state)[keep]
    assert np.abs(hidden - ref.last_hidden_state.numpy()[keep]).max() <= 1e-4
    assert np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


def test_no_pooler_and_bf16():
    cfg = BertConfig(
        vocab_size=11,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        add_pooling_layer=False,
    )
    model = BertModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    assert "pooler" not in params["params"]
    out = model.apply(params, ids)
    assert out.pooler_output is None and out.last_hidden_state.dtype == jnp.bfloat16
