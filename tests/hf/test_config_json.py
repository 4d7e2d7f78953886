"""config.json, checked field by field before any work, and the cheap header checks of hf.load.

Every bad config.json is an ``HFError`` naming the file, the field and the fix, raised before
the model is built or traced (``param_shapes`` is never called) and without touching a file.
A property test mutates valid configs: each either loads and runs, or raises a JloraError.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jlora.errors import HFError, JloraError
from jlora.hf.load import check_dtype, load
from jlora.models import arch_spec
from jlora.models.gpt2 import GPT2Config
from jlora.models.llama import DecoderConfig

hf_load = importlib.import_module("jlora.hf.load")  # the module (jlora.hf.load is the function)
IDS = np.array([[3, 7, 1, 9, 4]])
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
    "qwen2": lambda: tf.Qwen2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
    ),
    "gpt2": lambda: tf.GPT2Config(
        vocab_size=50,
        n_positions=16,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "bert": lambda: tf.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, save_hf):
    """``{arch: (torch model, directory)}``: tiny checkpoints transformers wrote."""
    out = {}
    for arch, make in CONFIGS.items():
        path = tmp_path_factory.mktemp(arch)
        kw = {"model_class": tf.AutoModel} if arch == "bert" else {}
        out[arch] = save_hf(make(), path, attn_implementation="eager", **kw), path
    return out


def _with_config(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose config.json is ``edit(config)``."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(config)))
    return dst


def _set(**changes):
    return lambda c: {**c, **changes}


def _drop(*names):
    return lambda c: {k: v for k, v in c.items() if k not in names}


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def no_trace(monkeypatch):
    """Fails the test if hf.load builds its shape trace (it must raise before that)."""

    def traced(*args, **kw):
        raise AssertionError("hf.load traced the model before its cheap checks")

    monkeypatch.setattr(hf_load, "param_shapes", traced)


def _fails(path: Path, field: str, *, within: float = 2.0) -> str:
    before = _files(path)
    start = time.perf_counter()
    with pytest.raises(HFError) as info:
        load(path)
    elapsed = time.perf_counter() - start
    msg = str(info.value)
    assert str(path / "config.json") in msg, msg
    assert field in msg, msg
    assert elapsed < within, f"{elapsed:.2f}s: {msg}"
    assert _files(path) == before  # nothing written, nothing removed
    return msg


LLAMA_CASES = {
    "eps-string": (_set(rms_norm_eps="1e-6"), "rms_norm_eps='1e-6' (a string) must be a positive"),
    "eps-negative": (_set(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06"),
    "eps-zero": (_set(rms_norm_eps=0), "rms_norm_eps=0"),
    "eps-nan": (_set(rms_norm_eps=math.nan), "rms_norm_eps=nan"),
    "hidden-float": (_set(hidden_size=32.5), "hidden_size=32.5 (a float) must be a positive int"),
    "hidden-integral-float": (_set(hidden_size=16.0), "hidden_size=16.0 (a float)"),
    "layers-bool": (_set(num_hidden_layers=True), "num_hidden_layers=True (a bool)"),
    "layers-null": (_set(num_hidden_layers=None), "num_hidden_layers=None (null)"),
    "no-vocab": (_drop("vocab_size"), "has no 'vocab_size', which must be a positive int"),
    "no-heads": (_drop("num_attention_heads"), "has no 'num_attention_heads'"),
    "vocab-negative": (_set(vocab_size=-5), "vocab_size=-5"),
    "heads-zero": (_set(num_attention_heads=0), "num_attention_heads=0"),
    "heads-not-dividing": (
        _set(num_attention_heads=3, head_dim=None),
        "num_attention_heads=3 (an int) must be a divisor of hidden_size=16",
    ),
    "kv-not-dividing": (
        _set(num_key_value_heads=3),
        "num_key_value_heads=3 (an int) must be a divisor",
    ),
    "head-dim-odd": (_set(head_dim=5), "head_dim=5 (an int) must be even"),
    "act-unknown": (_set(hidden_act="swiglu"), "hidden_act='swiglu'"),
    "tie-string": (_set(tie_word_embeddings="false"), "tie_word_embeddings='false'"),
    "bias-int": (_set(attention_bias=1), "attention_bias=1 (an int) must be true or false"),
    "rope-dynamic": (
        _set(rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
        "rope_parameters.rope_type='dynamic'",
    ),
    "rope-yarn-old-style": (
        _set(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0}),
        "rope_scaling.type='yarn'",
    ),
    "rope-linear-no-factor": (
        _set(rope_parameters={"rope_type": "linear"}),
        "has no 'rope_parameters.factor'",
    ),
    "rope-factor-string": (
        _set(rope_parameters={"rope_type": "linear", "factor": "2"}),
        "rope_parameters.factor='2'",
    ),
    "rope-llama3-freqs": (
        _set(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8,
                "low_freq_factor": 4,
                "high_freq_factor": 1,
                "original_max_position_embeddings": 16,
            }
        ),
        "rope_parameters.high_freq_factor=1",
    ),
    "rope-not-a-dict": (_set(rope_parameters="default"), "rope_parameters='default'"),
    "rope-theta-negative": (
        _set(rope_parameters={"rope_theta": -1.0}),
        "rope_parameters.rope_theta",
    ),
    "rope-two-disagree": (
        _set(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "sets both rope_parameters and rope_scaling",
    ),
    "rope-per-layer-type": (
        _set(rope_parameters={"full_attention": {"rope_type": "default"}}),
        "per-layer-type",
    ),
    "partial-rotary": (_set(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "attention-dropout": (_set(attention_dropout=0.1), "attention_dropout=0.1"),
    "quantized": (
        _set(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
        "quantization_config=",
    ),
    "pruned-heads": (_set(pruned_heads={"0": [1]}), "pruned_heads="),
    "model-type-not-a-string": (_set(model_type=7), "model_type=7 (an int)"),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_config_errors(case, checkpoints, tmp_path, no_trace):
    edit, field = LLAMA_CASES[case]
    _fails(_with_config(checkpoints["llama"][1], tmp_path / "m", edit), field)


OTHER_CASES = {
    ("qwen2", "layer-types-length"): (
        _set(layer_types=["full_attention"]),
        "must be a list of 2 entries",
    ),
    ("qwen2", "layer-types-unknown"): (
        _set(layer_types=["full_attention", "chunked_attention"]),
        "layer_types=['full_attention', 'chunked_attention']",
    ),
    ("qwen2", "window-negative"): (_set(sliding_window=-1), "sliding_window=-1"),
    ("qwen2", "use-window-string"): (_set(use_sliding_window="yes"), "use_sliding_window='yes'"),
    ("gpt2", "n-embd-string"): (_set(n_embd="16"), "n_embd='16' (a string)"),
    ("gpt2", "n-head-not-dividing"): (
        _set(n_head=3),
        "n_head=3 (an int) must be a divisor of n_embd=16",
    ),
    ("gpt2", "n-layer-float"): (_set(n_layer=2.0), "n_layer=2.0 (a float)"),
    ("gpt2", "no-n-layer"): (_drop("n_layer"), "has no 'n_layer'"),
    ("gpt2", "eps-negative"): (_set(layer_norm_epsilon=-1), "layer_norm_epsilon=-1"),
    ("gpt2", "act-unknown"): (_set(activation_function="mish"), "activation_function='mish'"),
    ("gpt2", "cross-attention"): (_set(add_cross_attention=True), "add_cross_attention=True"),
    ("gpt2", "scale-string"): (_set(scale_attn_weights="yes"), "scale_attn_weights='yes'"),
    ("gpt2", "dropout-range"): (_set(attn_pdrop=1.5), "attn_pdrop=1.5"),
    ("gpt2", "n-inner-zero"): (_set(n_inner=0), "n_inner=0"),
    ("gpt2", "aliases-disagree"): (_set(hidden_size=32), "n_embd=16, hidden_size=32"),
    ("bert", "relative-positions"): (
        _set(position_embedding_type="relative_key"),
        "position_embedding_type='relative_key'",
    ),
    ("bert", "decoder"): (_set(is_decoder=True), "is_decoder=True"),
    ("bert", "eps-string"): (_set(layer_norm_eps="x"), "layer_norm_eps='x'"),
    ("bert", "type-vocab-zero"): (_set(type_vocab_size=0), "type_vocab_size=0"),
    ("bert", "dropout-negative"): (_set(hidden_dropout_prob=-0.1), "hidden_dropout_prob=-0.1"),
    ("bert", "no-intermediate"): (_drop("intermediate_size"), "has no 'intermediate_size'"),
    ("bert", "heads-not-dividing"): (_set(num_attention_heads=3), "num_attention_heads=3"),
}


@pytest.mark.parametrize("arch, case", sorted(OTHER_CASES))
def test_other_architectures_config_errors(arch, case, checkpoints, tmp_path, no_trace):
    edit, field = OTHER_CASES[arch, case]
    _fails(_with_config(checkpoints[arch][1], tmp_path / "m", edit), field)


# ------------------------------------------------------------------ cheap checks first


@pytest.mark.parametrize("layers", [3, 2000, 10**12])
def test_layer_count_checked_on_headers_before_tracing(layers, checkpoints, tmp_path, no_trace):
    path = _with_config(checkpoints["llama"][1], tmp_path / "m", _set(num_hidden_layers=layers))
    start = time.perf_counter()
    with pytest.raises(HFError, match="does not fit its config.json") as info:
        load(path)
    assert time.perf_counter() - start < 2.0
    msg = str(info.value)
    assert (
        ("missing tensors: 'model.layers.2." in msg)
        if layers == 3
        else (f"gives {layers} layers" in msg)
    )


@pytest.mark.parametrize("edit, match", [
    (_set(intermediate_size=25), r"'model.layers.0.mlp.down_proj.weight' has shape \(16, 24\).*implies \(16, 25\)"),
    (_set(vocab_size=10**9), r"'model.embed_tokens.weight' has shape \(50, 16\).*implies \(1000000000, 16\)"),
    (_set(head_dim=2**40), r"'model.layers.0.self_attn.q_proj.weight' has shape \(16, 16\)"),
    (_set(tie_word_embeddings=True, vocab_size=51), r"shape mismatch"),
])  # fmt: skip
def test_shapes_checked_on_headers_before_tracing(edit, match, checkpoints, tmp_path, no_trace):
    path = _with_config(checkpoints["llama"][1], tmp_path / "m", edit)
    start = time.perf_counter()
    with pytest.raises(HFError, match=match) as info:
        load(path)
    assert time.perf_counter() - start < 2.0
    assert "missing tensors" not in str(info.value)  # a misshapen tensor is not also "missing"


def test_spec_shapes_equal_traced_shapes(checkpoints):
    """expected_hf_shapes (no tracing) is what the model's init gives, in HF layout."""
    for arch, (_, path) in checkpoints.items():
        hf = json.loads((path / "config.json").read_text())
        spec = arch_spec(hf["model_type"])
        model = spec.build(hf, None)
        traced = {}
        for p, leaf in hf_load.param_shapes(model, spec, hf).items():
            placeholder = np.broadcast_to(np.zeros((), np.float32), leaf.shape)
            traced.update({n: a.shape for n, a in spec.params_to_hf(p, placeholder)})
        assert traced == spec.expected_hf_shapes(hf), arch


# ------------------------------------------------------------------ what still loads


def _logits(model, params):
    out = model.apply(params, IDS)
    return np.asarray(getattr(out, "last_hidden_state", out))


@pytest.mark.parametrize("arch, edit", [
    ("llama", _set(my_custom_field={"anything": [1, 2]}, architectures=["X"], dtype="bfloat16")),
    ("llama", _set(quantization_config=None, pruned_heads={}, pretraining_tp=2)),
    ("llama", _set(rope_scaling={"rope_type": "default", "rope_theta": 10000.0})),
    ("gpt2", lambda c: {**_drop("n_embd", "n_head", "n_layer", "n_positions")(c),
                        "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2,
                        "max_position_embeddings": 16}),
    ("bert", _set(position_embedding_type=None, classifier_dropout=0.3)),
])  # fmt: skip
def test_harmless_fields_load_unchanged(arch, edit, checkpoints, tmp_path):
    torch_model, src = checkpoints[arch]
    model, params, _ = load(src)
    model2, params2, _ = load(_with_config(src, tmp_path / "m", edit))
    np.testing.assert_array_equal(_logits(model2, params2), _logits(model, params))


def test_windows_as_transformers_reads_them(checkpoints, tmp_path, save_hf):
    # Llama ignores a sliding_window key; Mistral defaults it to 4096 when absent
    llama = _with_config(checkpoints["llama"][1], tmp_path / "l", _set(sliding_window=2))
    assert load(llama)[0].config.sliding_windows is None
    mistral = _with_config(checkpoints["llama"][1], tmp_path / "m", _set(model_type="mistral"))
    assert load(mistral)[0].config.sliding_windows == (4096, 4096)
    # Qwen2 without layer_types: windows from max_window_layers on, as transformers derives
    qwen_model, qwen = checkpoints["qwen2"]
    path = _with_config(qwen, tmp_path / "q", _drop("layer_types"))
    model, params, _ = load(path)
    assert model.config.sliding_windows == (None, 3)
    ref = tf.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = np.random.default_rng(0).integers(0, 50, (1, 9))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.apply(params, ids), want, atol=1e-4)
    with torch.no_grad():  # the window matters: the checkpoint's own model agrees too
        np.testing.assert_allclose(qwen_model(torch.tensor(ids)).logits.numpy(), want, atol=1e-5)


def test_from_hf_names_a_default_source():
    with pytest.raises(HFError, match=r"^config.json: n_embd='8'"):
        GPT2Config.from_hf({"vocab_size": 5, "n_embd": "8", "n_head": 2, "n_layer": 1})
    with pytest.raises(HFError, match=r"^my.json has no 'vocab_size'"):
        DecoderConfig.from_hf({"model_type": "llama"}, source="my.json")


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize("dtype", [jnp.int8, "int8", "notadtype", object(), True, np.float64,
                                   "float8_e4m3fn", jnp.complex64])  # fmt: skip
def test_bad_dtype_is_refused_before_any_work(dtype, checkpoints, no_trace):
    with pytest.raises(HFError, match=r"dtype=.*(not a dtype|not a float dtype)"):
        load(checkpoints["llama"][1], dtype=dtype)


def test_float_dtypes_accepted():
    for d in (None, jnp.float32, "bfloat16", np.float16):
        assert check_dtype(d) in (None, jnp.float32, jnp.bfloat16, jnp.float16)


@pytest.mark.parametrize("path, match", [
    (5, "must be a directory path"), (b"/tmp", "must be a directory path"),
    (None, "must be a directory path"), ("", "not a directory path"),
    ("a\0b", "not a directory path"),
])  # fmt: skip
def test_bad_path_is_refused(path, match):
    with pytest.raises(HFError, match=match):
        load(path)


def test_unreadable_config_json(checkpoints, tmp_path):
    path = shutil.copytree(checkpoints["llama"][1], tmp_path / "m")
    (path / "config.json").write_bytes(b'{"model_type": "llama", "x": "\xff"}')
    with pytest.raises(HFError, match="not valid JSON"):
        load(path)
    (path / "config.json").write_text("[" * 100_000)
    with pytest.raises(HFError, match="config.json"):
        load(path)


# ------------------------------------------------------------------ property


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=5,
)
_EXTRA_KEYS = ["rope_scaling", "rope_parameters", "head_dim", "sliding_window", "layer_types",
               "quantization_config", "pruned_heads", "partial_rotary_factor", "hidden_size",
               "attention_dropout", "model_type", "tie_word_embeddings", "n_inner", "new_field"]  # fmt: skip


@st.composite
def _near(draw, value):
    """A value close to ``value``: another type of the same number, an edge, a sub-edit."""
    if isinstance(value, bool):
        return draw(st.sampled_from([not value, int(value), str(value).lower(), None]))
    if isinstance(value, int):
        return draw(st.sampled_from([value + 1, value - 1, 2 * value, 0, -value, float(value),
                                     str(value), value + 0.5, True, 2**62]))  # fmt: skip
    if isinstance(value, float):
        return draw(st.sampled_from([-value, 0.0, str(value), 1e308, math.inf, value * 10, 1]))
    if isinstance(value, str):
        options = ["", value.upper(), value + "x", "default", "linear", "llama3", "yarn",
                   "sliding_attention", "mistral", "qwen2", "gpt2", "bert"]  # fmt: skip
        return draw(st.sampled_from(options))
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.booleans()):
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: draw(_near(value[key]))}
    if isinstance(value, list) and value:
        return draw(st.sampled_from([value[:-1], value + value[-1:], [draw(_near(value[0]))]]))
    return draw(_VALUES)


@st.composite
def _mutated(draw):
    arch = draw(st.sampled_from(sorted(CONFIGS)))
    config = CONFIGS[arch]().to_dict()
    config = json.loads(json.dumps(config, default=str))  # as save_pretrained writes it
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(config) + _EXTRA_KEYS))
        how = draw(st.sampled_from(["drop", "near", "near", "any"]))
        if how == "drop":
            config.pop(key, None)
        elif how == "near":
            config[key] = draw(_near(config.get(key)))
        else:
            config[key] = draw(_VALUES)
    return arch, config


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=_mutated())
def test_mutated_config_loads_and_runs_or_raises_a_jlora_error(case, checkpoints):
    arch, config = case
    with tempfile.TemporaryDirectory() as tmp:
        path = shutil.copytree(checkpoints[arch][1], Path(tmp) / "m")
        (path / "config.json").write_text(json.dumps(config))
        tracemalloc.start()
        start = time.perf_counter()
        try:
            model, params, _ = load(path)
        except JloraError:
            assert time.perf_counter() - start < 2.0  # refused by the cheap checks
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB on host while loading"
        out = model.apply(params, IDS)
        jax.block_until_ready(jax.tree.leaves(out))
        assert time.perf_counter() - start < 60.0
