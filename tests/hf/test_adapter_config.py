"""load_peft's adapter_config.json and arguments: checked before any work, errors naming the
file and the field, nothing touched; a property test over mutated adapter configs.

The adapters are written by peft itself on a tiny transformers Llama.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jlora
from jlora.errors import ConfigError, HFError, JloraError
from jlora.hf import load, load_peft

IDS = np.array([[3, 7, 1, 9, 4, 2]])
_peft_load = importlib.import_module("jlora.hf.peft_load")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_hf):
    """``(model, base params, adapter dir, layer-replication adapter dir, peft logits)``."""
    root = tmp_path_factory.mktemp("adapters")
    cfg = tf.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch_model = save_hf(cfg, root / "base")
    model, params, _ = load(root / "base")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)  # fmt: skip
    adapted = peft.get_peft_model(torch_model, lora)
    adapted.save_pretrained(root / "adapter")
    with torch.no_grad():
        want = adapted(torch.tensor(IDS)).logits.numpy()
    torch.manual_seed(1)
    base2 = tf.AutoModelForCausalLM.from_pretrained(root / "base").eval()
    replicated = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False,
                                 layer_replication=[[0, 1], [0, 1]])  # fmt: skip
    peft.get_peft_model(base2, replicated).save_pretrained(root / "replicated")
    return model, params, root / "adapter", root / "replicated", want


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _with_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    d = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(edit(d)))
    return dst


def test_the_peft_adapter_loads_and_matches_peft(tiny):
    model, params, path, _, want = tiny
    adapted, config = load_peft(params, path)
    assert (config.rank, config.alpha, set(config.targets)) == (2, 4.0, {"q_proj", "v_proj"})
    np.testing.assert_allclose(jlora.lora(model.apply)(adapted, IDS), want, atol=1e-4)


def test_layer_replication_is_refused(tiny):
    """peft's layer_replication adapter used to load and give wrong logits."""
    _, params, _, path, _ = tiny
    before = _files(path)
    with pytest.raises(ConfigError) as info:
        load_peft(params, path)
    msg = str(info.value)
    assert str(path / "adapter_config.json") in msg and "layer_replication=[[0, 1], [0, 1]]" in msg
    assert _files(path) == before


CASES = {
    "r-float": ({"r": 4.7}, "r=4.7 (a float) must be a positive int"),
    "r-string": ({"r": "8"}, "r='8' (a string)"),
    "rslora-string": ({"use_rslora": "no"}, "use_rslora='no' (a string) must be true or false"),
    "alpha-string": ({"lora_alpha": "4"}, "lora_alpha='4'"),
    "alpha-list": ({"lora_alpha": [4]}, "lora_alpha=[4]"),
    "dropout-range": ({"lora_dropout": 1.5}, "lora_dropout=1.5"),
    "dropout-bool": ({"lora_dropout": True}, "lora_dropout=True"),
    "targets-int": ({"target_modules": 3}, "target_modules=3"),
    "targets-null": ({"target_modules": None}, "target_modules=None"),
    "layers-string": ({"layers_to_transform": "0"}, "layers_to_transform='0'"),
    "layers-pattern-int": ({"layers_to_transform": [0], "layers_pattern": 1}, "layers_pattern=1"),
    "rank-pattern-float": ({"rank_pattern": {"q_proj": 1.5}}, "rank_pattern="),
    "init-unknown": ({"init_lora_weights": "kaiming"}, "init_lora_weights='kaiming'"),
    "init-loftq": (
        {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
        "init_lora_weights='loftq'",
    ),  # fmt: skip
    "dora-int": ({"use_dora": 1}, "use_dora=1"),
    "bias-unknown": ({"bias": "some"}, "bias='some'"),
    "modules-to-save-string": ({"modules_to_save": "lm_head"}, "modules_to_save='lm_head'"),
    "megatron": ({"megatron_config": {"tp": 2}}, "megatron_config="),
    "lora-bias": ({"lora_bias": True}, "lora_bias=True"),
    "target-parameters": ({"target_parameters": ["mlp.experts.w"]}, "target_parameters="),
    "token-indices": ({"trainable_token_indices": [3]}, "trainable_token_indices=[3]"),
    "qalora": ({"use_qalora": True}, "use_qalora=True"),
    "alora": ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens=[1, 2]"),
    "unknown-set": ({"future_variant": {"on": True}}, "future_variant={'on': True} is set"),
    "tying-int": ({"ensure_weight_tying": 1}, "ensure_weight_tying=1"),
    "peft-type": ({"peft_type": "IA3"}, "peft_type='IA3'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_config_errors_name_the_file_and_field(case, tiny, tmp_path):
    _, params, src, _, _ = tiny
    changes, field = CASES[case]
    path = _with_config(src, tmp_path / "a", lambda d: {**d, **changes})
    before = _files(path)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_peft(params, path)
    assert time.perf_counter() - start < 2.0
    msg = str(info.value)
    assert str(path / "adapter_config.json") in msg and field in msg, msg
    assert _files(path) == before


def test_adapter_config_that_is_not_an_object_or_not_json(tiny, tmp_path):
    _, params, src, _, _ = tiny
    path = shutil.copytree(src, tmp_path / "a")
    (path / "adapter_config.json").write_text("[1]")
    with pytest.raises(HFError, match="not a JSON object"):
        load_peft(params, path)
    (path / "adapter_config.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(HFError, match="not valid JSON"):
        load_peft(params, path)


@pytest.mark.parametrize("kw, match", [
    (dict(dtype=jnp.int8), "dtype=.*not a float dtype"), (dict(dtype="nope"), "not a dtype"),
    (dict(dtype=np.float64), "not a float dtype"), (dict(path=5), "must be a directory path"),
    (dict(path=""), "not a directory path"), (dict(path=None), "must be a directory path"),
])  # fmt: skip
def test_load_peft_arguments(kw, match, tiny, monkeypatch):
    _, params, src, _, _ = tiny
    monkeypatch.setattr(_peft_load, "_read_config", _never)  # refused before any file is read
    with pytest.raises(HFError, match=match):
        load_peft(params, kw.pop("path", src), **kw)


def _never(*args, **kw):
    raise AssertionError("load_peft read a file before checking its arguments")


def test_float_dtypes_accepted(tiny):
    _, params, src, _, _ = tiny
    adapted, _ = load_peft(params, src, dtype="bfloat16")
    q = adapted["params"]["model"]["layers"]["0"]["self_attn"]["q_proj"]
    assert q["kernel_lora_a"].dtype == jnp.bfloat16


# ------------------------------------------------------------------ property

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.sampled_from([0, 1, 2, 4, -1, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(
        [
            "q_proj",
            "v_proj",
            "k_proj",
            "layers",
            ".*q_proj",
            "all-linear",
            "pissa",
            "olora",
            "gaussian",
            "none",
            "all",
            "LORA",
        ]
    )  # fmt: skip
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(_SCALARS.filter(lambda k: isinstance(k, str)), inner, max_size=3)
    ),  # fmt: skip
    max_leaves=5,
)
_KEYS = ["r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
         "layers_pattern", "rank_pattern", "alpha_pattern", "lora_dropout", "use_rslora",
         "init_lora_weights", "ensure_weight_tying", "use_dora", "bias", "modules_to_save",
         "layer_replication", "fan_in_fan_out", "peft_type", "new_field"]  # fmt: skip


@st.composite
def _mutations(draw):
    out = {}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(_KEYS))
        kind = draw(st.sampled_from(["drop", "value", "small"]))
        if kind == "drop":
            out[key] = _DROP
        elif kind == "small":  # plausible values, so that many examples load
            out[key] = draw(st.sampled_from([1, 2, 3, 4, 8, 0.5, 2.0, True, False, None,
                                             ["q_proj"], ["v_proj", "k_proj"], [0], [1], 1e30,
                                             {"q_proj": 1}, {"v_proj": 8.0}, "pissa"]))  # fmt: skip
        else:
            out[key] = draw(_VALUES)
    return out


_DROP = object()


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(mutations=_mutations())
def test_mutated_adapter_config_applies_or_raises_a_jlora_error(mutations, tiny):
    model, params, src, _, _ = tiny
    with tempfile.TemporaryDirectory() as tmp:
        path = shutil.copytree(src, Path(tmp) / "a")
        d = json.loads((path / "adapter_config.json").read_text())
        for k, v in mutations.items():
            if v is _DROP:
                d.pop(k, None)
            else:
                d[k] = v
        (path / "adapter_config.json").write_text(json.dumps(d))
        start = time.perf_counter()
        try:
            adapted, config = load_peft(params, path)
        except JloraError:
            assert time.perf_counter() - start < 2.0
            return
        out = jlora.lora(model.apply)(adapted, IDS)
        merged = model.apply(jlora.merge(adapted), IDS)
        jax.block_until_ready((out, merged))
        if np.isfinite(np.asarray(out)).all() and math.isfinite(config.alpha / config.rank):
            np.testing.assert_allclose(out, merged, rtol=1e-3, atol=1e-3)
        assert time.perf_counter() - start < 60.0
