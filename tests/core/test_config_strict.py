"""Strict types in LoraConfig, LoraConfig.from_json and LoraConfig.from_peft (adapter_config).

Every field is checked with its type; an adapter_config field is read, accepted as metadata, or
refused as a feature jlora does not implement (jlora.peft_config.PEFT_FIELDS). Errors are
ConfigErrors that name the file (or the field) and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time

import peft
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jlora import LoraConfig
from jlora.errors import ConfigError
from jlora.peft_config import PEFT_FIELDS

# ------------------------------------------------------------------ LoraConfig


@pytest.mark.parametrize("kw, field", [
    (dict(use_rslora="no"), "use_rslora='no'"), (dict(use_rslora=1), "use_rslora=1"),
    (dict(use_rslora=None), "use_rslora=None"), (dict(use_dora="no"), "use_dora='no'"),
    (dict(dropout=True), "dropout=True"), (dict(dropout="0.1"), "dropout='0.1'"),
    (dict(dropout=math.nan), "dropout=nan"),
    (dict(rank=4.0), "rank=4.0"), (dict(rank="8"), "rank='8'"),
    (dict(alpha="16"), "alpha='16'"), (dict(alpha=True), "alpha=True"),
    (dict(alpha=1e39), "alpha=1e+39"), (dict(alpha=math.inf), "alpha=inf"),
    (dict(rank_pattern={"q": 2.0}), "rank_pattern"), (dict(rank_pattern={"q": True}), "rank_pattern"),
    (dict(alpha_pattern={"q": True}), "alpha_pattern"), (dict(alpha_pattern={"q": "2"}), "alpha_pattern"),
    (dict(init=1), "init=1"), (dict(init=None), "init=None"),
    (dict(layers=True), "layers=True"), (dict(layers=[True]), "layers"), (dict(layers=[1.0]), "layers"),
    (dict(targets=b"q"), "targets"), (dict(targets={"q": 1}), "targets"),
    (dict(targets={"q", 1}), "targets"), (dict(exclude=5), "exclude"),
    (dict(layers=[0], layers_pattern=[1]), "layers_pattern"),
])  # fmt: skip
def test_lora_config_field_types(kw, field):
    kw.setdefault("targets", ["q"])
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kw)
    assert field in str(info.value)


def test_lora_config_accepts_what_it_did():
    c = LoraConfig(rank=4, alpha=8, targets={"v", "q"}, dropout=0, rank_pattern={"q": 2},
                   alpha_pattern={"q": 3}, use_rslora=True)  # fmt: skip
    assert c.targets == ("q", "v") and c.dropout == 0.0 and c.alpha_pattern == {"q": 3.0}


# ------------------------------------------------------------------ from_json


@pytest.mark.parametrize("s, match", [
    ("{not json", "does not parse"), ("[1, 2]", "must be an object"), (b"\xff", "does not parse"),
    ("[" * 100_000, "does not parse"), (5, "takes a JSON string or a dict"),
    ('{"rank": "8", "targets": ["q"]}', "rank='8'"),
    ('{"rank": 8, "targets": ["q"], "use_rslora": "no"}', "use_rslora='no'"),
    ('{"rank": 8, "targets": ["q"], "dropout": true}', "dropout=True"),
    ({"rank": 2, "targets": ["q"], 1: 2}, "unknown LoraConfig fields ['1']"),
])  # fmt: skip
def test_from_json_errors(s, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        LoraConfig.from_json(s)


# ------------------------------------------------------------------ from_peft

GOOD = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
SOURCE = "/models/adapter/adapter_config.json"


@pytest.mark.parametrize("changes, field", [
    (dict(r=4.7), "r=4.7 (a float) must be a positive int"), (dict(r="8"), "r='8' (a string)"),
    (dict(r=8.0), "r=8.0"), (dict(r=0), "r=0"), (dict(r=True), "r=True"),
    (dict(lora_alpha="16"), "lora_alpha='16'"), (dict(lora_alpha=True), "lora_alpha=True"),
    (dict(lora_alpha=0), "lora_alpha=0"), (dict(lora_alpha=1e300), "lora_alpha=1e+300"),
    (dict(lora_dropout=1.0), "lora_dropout=1.0"), (dict(lora_dropout="0.1"), "lora_dropout='0.1'"),
    (dict(lora_dropout=True), "lora_dropout=True"), (dict(lora_dropout=-0.1), "lora_dropout=-0.1"),
    (dict(use_rslora="no"), "use_rslora='no' (a string) must be true or false"),
    (dict(use_rslora=0), "use_rslora=0"),
    (dict(target_modules=5), "target_modules=5"), (dict(target_modules=[1]), "target_modules=[1]"),
    (dict(target_modules=None), "target_modules=None"), (dict(target_modules=[]), "target_modules=[]"),
    (dict(target_modules=[""]), "target_modules"), (dict(exclude_modules=[3]), "exclude_modules"),
    (dict(layers_to_transform="0"), "layers_to_transform='0'"),
    (dict(layers_to_transform=[-1]), "layers_to_transform=[-1]"),
    (dict(layers_to_transform=[True]), "layers_to_transform=[True]"),
    (dict(layers_to_transform=[0], layers_pattern=5), "layers_pattern=5"),
    (dict(rank_pattern={"q_proj": 1.5}), "rank_pattern="), (dict(rank_pattern={"q_proj": "2"}), "rank_pattern="),
    (dict(rank_pattern=[["q_proj", 2]]), "rank_pattern="), (dict(alpha_pattern={"q_proj": None}), "alpha_pattern="),
    (dict(rank_pattern={"(": 2}), "rank_pattern key '('"),
    (dict(init_lora_weights="xavier"), "init_lora_weights='xavier'"),
    (dict(init_lora_weights=1), "init_lora_weights=1"),
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "init_lora_weights='loftq'"),
    (dict(init_lora_weights="corda"), "init_lora_weights='corda'"),
    (dict(init_lora_weights="lora_ga"), "init_lora_weights='lora_ga'"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication=[[0, 2], [1, 2]]"),
    (dict(use_dora=1), "use_dora=1"), (dict(use_dora="no"), "use_dora='no'"),
    (dict(bias="some"), "bias='some'"), (dict(bias=True), "bias=True"),
    (dict(modules_to_save="lm_head"), "modules_to_save="), (dict(modules_to_save=[1]), "modules_to_save="),
    (dict(megatron_config={"tensor_model_parallel_size": 2}), "megatron_config="),
    (dict(lora_bias=True), "lora_bias=True"), (dict(target_parameters=["experts.w"]), "target_parameters="),
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices="),
    (dict(use_qalora=True), "use_qalora=True"), (dict(alora_invocation_tokens=[5]), "alora_invocation_tokens="),
    (dict(velora_config={"num_groups": 2}), "velora_config="),
    (dict(monteclora_config={"num_samples": 2}), "monteclora_config="),
    (dict(use_bdlora={"nblocks": 2}), "use_bdlora="), (dict(arrow_config={"top_k": 2}), "arrow_config="),
    (dict(kasa_config={"beta": 1}), "kasa_config="),
    (dict(some_new_peft_feature={"on": True}), "some_new_peft_feature={'on': True} is set, but jlora does not know"),
    (dict(base_model_name_or_path=5), "base_model_name_or_path=5"),
    (dict(inference_mode="yes"), "inference_mode='yes'"), (dict(fan_in_fan_out="no"), "fan_in_fan_out='no'"),
    (dict(ensure_weight_tying=1), "ensure_weight_tying=1"), (dict(task_type=["CAUSAL_LM"]), "task_type="),
    (dict(auto_mapping="x"), "auto_mapping='x'"), (dict(qalora_group_size=1.5), "qalora_group_size=1.5"),
])  # fmt: skip
def test_from_peft_field_errors_name_the_file_and_field(changes, field):
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_peft({**GOOD, **changes}, source=SOURCE)
    msg = str(info.value)
    assert msg.startswith(SOURCE) and field in msg, msg


@pytest.mark.parametrize("d, match", [
    ({**GOOD, "peft_type": "IA3"}, "peft_type='IA3'"), ({**GOOD, "peft_type": None}, "peft_type=None"),
    ([GOOD], "must hold a JSON object"),
])  # fmt: skip
def test_from_peft_whole_file_errors(d, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        LoraConfig.from_peft(d)


def test_from_peft_default_source_names_adapter_config():
    with pytest.raises(ConfigError, match=r"^adapter_config.json: r=4.7"):
        LoraConfig.from_peft({**GOOD, "r": 4.7})


@pytest.mark.parametrize("changes, check", [
    (dict(some_new_flag=False, other_new=None, third_new={}, fourth_new=[]), lambda c: c.rank == 4),
    (dict(init_lora_weights="eva", eva_config={"rho": 2.0}), lambda c: c.init == "default"),
    (dict(init_lora_weights="orthogonal"), lambda c: c.init == "default"),
    (dict(init_lora_weights="mica"), lambda c: c.init == "default"),
    (dict(init_lora_weights="gaussian"), lambda c: c.init == "gaussian"),
    (dict(init_lora_weights="pissa_niter_4"), lambda c: c.init == "pissa_niter_4"),
    (dict(init_lora_weights=False), lambda c: c.init == "random"),
    (dict(loftq_config={"loftq_bits": 4}), lambda c: c.init == "default"),  # peft ignores it too
    (dict(layers_pattern="layers"), lambda c: c.layers is None and c.layers_pattern is None),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), lambda c: c.layers is None),
    (dict(lora_dropout=None, rank_pattern=None, alpha_pattern=None), lambda c: c.dropout == 0),
    (dict(bias=None, use_dora=False, modules_to_save=[], megatron_config=None), lambda c: True),
    (dict(target_modules={"v_proj", "q_proj"}), lambda c: c.targets == ("q_proj", "v_proj")),
    (dict(fan_in_fan_out=True, inference_mode=True, task_type="CAUSAL_LM"), lambda c: True),
])  # fmt: skip
def test_from_peft_accepts_what_does_not_change_the_math(changes, check):
    assert check(LoraConfig.from_peft({**GOOD, **changes}))


def test_every_peft_lora_field_is_classified():
    """A new peft field must be classified here before jlora reads its files: read,
    metadata, or unsupported (PEFT_FIELDS); none of ours is stale either."""
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)} - {"peft_type"}
    assert theirs == set(PEFT_FIELDS)


def test_a_file_peft_wrote_reads_back():
    pc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True)
    d = json.loads(json.dumps(pc.to_dict(), default=lambda o: sorted(o) if isinstance(o, set)
                              else getattr(o, "value", str(o))))  # fmt: skip
    c = LoraConfig.from_peft(d)
    assert (c.rank, c.alpha, c.targets, c.use_rslora) == (4, 8.0, ("q_proj",), True)


# ------------------------------------------------------------------ property

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    changes=st.dictionaries(
        st.sampled_from(sorted(PEFT_FIELDS) + ["peft_type", "new_field"]), _JSON, max_size=4
    ),
    drop=st.lists(st.sampled_from(sorted(GOOD)), max_size=2),
)
def test_from_peft_returns_a_config_or_raises_a_config_error(changes, drop):
    d = {k: v for k, v in {**GOOD, **changes}.items() if k not in drop}
    start = time.perf_counter()
    try:
        config = LoraConfig.from_peft(d, source=SOURCE)
    except ConfigError as e:
        assert str(e).startswith(SOURCE)
    else:
        assert LoraConfig.from_json(config.to_json()) == config
    assert time.perf_counter() - start < 0.5
