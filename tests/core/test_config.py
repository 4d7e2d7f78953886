"""LoraConfig validation and PEFT adapter_config conversion."""

import json

import peft
import pytest

from jlora import LoraConfig
from jlora.errors import ConfigError, JloraError


def test_defaults_and_scaling():
    c = LoraConfig(targets=["q"])
    assert (c.rank, c.alpha, c.dropout, c.init) == (8, 8.0, 0.0, "default")
    assert c.scaling_for(8, 16) == 2.0
    assert LoraConfig(targets=["q"], use_rslora=True).scaling_for(16, 8) == 2.0


def test_patterns_pick_first_matching_key():
    c = LoraConfig(rank=4, alpha=8, targets=["q", "v"], rank_pattern={"v": 2, r"layers\.1\..*": 8},
                   alpha_pattern={"q": 32})
    assert c.rank_for("model.layers.0.v") == 2
    assert c.rank_for("model.layers.1.q") == 8
    assert c.rank_for("model.layers.0.q") == 4
    assert c.alpha_for("model.layers.0.q") == 32.0
    assert c.alpha_for("model.layers.0.v") == 8.0


@pytest.mark.parametrize("kw, field", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(rank=2.5), "rank"),
    (dict(rank=True), "rank"),
    (dict(alpha=0), "alpha"), (dict(alpha=-1.0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(targets=None), "targets"), (dict(targets=""), "targets"),
    (dict(targets="(unclosed"), "targets"), (dict(targets=[1, 2]), "targets"),
    (dict(targets=3), "targets"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
    (dict(init="xavier"), "init"), (dict(use_dora=1), "use_dora"),
    (dict(bias="some"), "bias"), (dict(modules_to_save="head"), "modules_to_save"),
    (dict(modules_to_save=["head", ""]), "modules_to_save"),
    (dict(layers=[-1]), "layers"), (dict(layers="0"), "layers"),
    (dict(targets=r".*q", layers=[0]), "layers"),
    (dict(layers_pattern="layers"), "layers_pattern"),
    (dict(rank_pattern={"q": 0}), "rank_pattern"), (dict(rank_pattern={"q": 1.5}), "rank_pattern"),
    (dict(rank_pattern=[("q", 2)]), "rank_pattern"), (dict(alpha_pattern={"(": 2}), "alpha_pattern"),
    (dict(alpha_pattern={"q": -1}), "alpha_pattern"),
])
def test_invalid_fields_raise_naming_the_field(kw, field):
    kw.setdefault("targets", ["q"])
    with pytest.raises(ConfigError, match=field) as e:
        LoraConfig(**kw)
    assert isinstance(e.value, JloraError) and isinstance(e.value, ValueError)


def test_frozen_and_hashable():
    c = LoraConfig(targets=["q"], rank_pattern={"q": 2})
    with pytest.raises(AttributeError):
        c.rank = 3
    assert hash(c) == hash(LoraConfig(targets=("q",), rank_pattern={"q": 2}))
    assert c == LoraConfig(targets=("q",), rank_pattern={"q": 2})


def test_init_booleans_map_to_peft_values():
    assert LoraConfig(targets=["q"], init=True).init == "default"
    assert LoraConfig(targets=["q"], init=False).init == "random"
    assert LoraConfig(targets=["q"], init="pissa_niter_4").init == "pissa_niter_4"


def test_json_round_trip():
    c = LoraConfig(rank=4, alpha=8, targets=["q", "v"], exclude=r".*skip.*", layers=[0, 2],
                   layers_pattern="layers", rank_pattern={"v": 2}, alpha_pattern={"q": 3.5},
                   dropout=0.1, init="gaussian", use_rslora=True)
    assert LoraConfig.from_json(c.to_json()) == c
    with pytest.raises(ConfigError, match="unknown LoraConfig fields"):
        LoraConfig.from_json({"rank": 2, "targets": ["q"], "colour": 1})


def _jsonable(o):  # as PeftConfig.save_pretrained writes sets and enums
    return sorted(o) if isinstance(o, set) else getattr(o, "value", str(o))


def test_peft_round_trip_through_peft_itself():
    c = LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"], layers=[0, 2],
                   layers_pattern="layers", exclude=["o_proj"], rank_pattern={"v_proj": 2},
                   alpha_pattern={"q_proj": 3}, dropout=0.05, use_rslora=True)
    d = c.to_peft(base_model_name_or_path="tiny", task_type="CAUSAL_LM")
    pc = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
    back = LoraConfig.from_peft(json.loads(json.dumps(pc.to_dict(), default=_jsonable)))
    assert back == c
    assert pc.r == 4 and pc.lora_alpha == 8 and pc.lora_dropout == 0.05 and pc.use_rslora
    assert pc.rank_pattern == {"v_proj": 2} and pc.alpha_pattern == {"q_proj": 3}


@pytest.mark.parametrize("d, what", [
    (dict(peft_type="IA3", target_modules=["q"]), "peft_type"),
    (dict(peft_type="LORA", target_modules=["q"], layer_replication=[[0, 1]]),
     "layer_replication.*layer replication"),
    (dict(peft_type="LORA", target_modules=["q"], lora_bias=True), "lora_bias.*a bias on lora_B"),
    (dict(peft_type="LORA", target_modules=["q"], bias="some"), "bias"),
    (dict(peft_type="LORA", target_modules=["q"], modules_to_save="head"), "modules_to_save"),
])
def test_from_peft_rejects_what_it_cannot_reproduce(d, what):
    with pytest.raises(ConfigError, match=what):
        LoraConfig.from_peft(d)


def test_from_peft_drops_layers_for_regex_targets():
    c = LoraConfig.from_peft({"target_modules": ".*q", "layers_to_transform": [0], "r": 2})
    assert c.layers is None and c.targets == ".*q"
