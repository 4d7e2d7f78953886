"""Target rules equal PEFT's: the same module paths match under jlora and under peft's own
matching function (check_target_module_exists / get_pattern_key), on real model names."""

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

import jlora
from jlora import paths

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _names(model):
    return [n for n, _ in model.named_modules() if n]


@pytest.fixture(scope="module")
def llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


EXTRA = [  # names that exercise nesting, MoE indices and near-misses
    "model.layers.1.mlp.experts.0.down_proj", "model.layers.12.mlp.experts.3.up_proj",
    "transformer.h.2.attn.c_attn", "encoder.layer.0.attention.self.query",
    "my_q_proj", "q_proj", "blocks.0.q_proj.inner", "model.decoder.layers.2.fc1",
]

RULES = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.q_proj"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["proj", "down_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules=r".*layers\.1\..*"),
    dict(target_modules=r"q_proj"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
    dict(target_modules=["down_proj", "up_proj"], layers_to_transform=[1],
         layers_pattern="layers"),
    dict(target_modules=["c_attn", "query", "fc1"], layers_to_transform=[0, 2],
         layers_pattern=["h", "layer"]),
    dict(target_modules=["q_proj", "v_proj", "o_proj"], exclude_modules=["o_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"),
    dict(target_modules=r".*_proj", exclude_modules=["model.layers.1.self_attn.q_proj"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),
]


def _jlora_match(name, rule):
    return paths.target_matches(
        name, rule["target_modules"], exclude=rule.get("exclude_modules"),
        layers=rule.get("layers_to_transform"), layers_pattern=rule.get("layers_pattern"))


def _peft_match(name, rule):
    hit = check_target_module_exists(peft.LoraConfig(**rule), name)
    return bool(hit) and type(hit).__name__ != "_ExcludedModule"


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_target_rules_equal_peft(llama, rule):
    names = _names(llama) + EXTRA
    ours = [n for n in names if _jlora_match(n, rule)]
    theirs = [n for n in names if _peft_match(n, rule)]
    assert ours == theirs
    assert theirs, "a rule in the table must match something"


@pytest.mark.parametrize("keys", [["v_proj"], [r"layers\.1\..*"], ["q_proj", r"layers\.1\..*"],
                                  ["self_attn.q_proj"], ["proj"], [r".*mlp\..*"]])
def test_pattern_keys_equal_peft(llama, keys):
    for name in _names(llama) + EXTRA:
        theirs = get_pattern_key(keys, name)
        ours = paths.pattern_key(keys, name)
        assert (ours if ours is not None else name) == theirs


def _tree_like(model):
    """A params tree whose module paths are the torch module names (kernels transposed)."""
    tree = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
            node = tree
            for part in name.split("."):
                node = node.setdefault(part, {})
            w = mod.weight.detach().numpy()
            if isinstance(mod, torch.nn.Linear):
                node["kernel"] = np.ascontiguousarray(w.T)
            else:
                node["embedding"] = w
    return tree


def _peft_adapted(model, **kw):
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, **kw))
    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in pm.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer) and m.r)


@pytest.mark.parametrize("kw", [
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1, 2]),
    dict(target_modules=["embed_tokens", "o_proj"],
         exclude_modules=["model.layers.0.self_attn.o_proj"]),
    dict(target_modules=r".*\.mlp\.(gate|up)_proj", rank_pattern={"up_proj": 1}),
], ids=str)
def test_plan_equals_peft_injection(kw):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=2,
                                   num_key_value_heads=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    tree = _tree_like(model)
    config = jlora.LoraConfig.from_peft(peft.LoraConfig(r=2, **kw).to_dict())
    plan = jlora.plan(tree, config)
    theirs = _peft_adapted(model, **kw)
    assert [e.module for e in plan] == theirs
    pm_ranks = {}
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=2, **kw))
    for n, m in pm.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and m.r:
            pm_ranks[n.removeprefix("base_model.model.")] = (m.r["default"], m.scaling["default"])
    assert {e.module: (e.rank, e.scaling) for e in plan} == pm_ranks


def test_all_linear_leaves_out_output_head():
    tree = {"model": {"q": {"kernel": np.zeros((4, 4))}}, "lm_head": {"kernel": np.zeros((4, 9))}}
    plan = jlora.plan(tree, jlora.LoraConfig(rank=2, targets="all-linear"))
    assert [e.module for e in plan] == ["model.q"]
    assert jax.tree.leaves(tree)  # the tree itself is untouched
