"""Where save_peft and save_merged may write, what they replace, and their argument checks.

Every refusal is an OutputPathError (an HFError) raised before anything is written: the
message names the path and the fix, and no file in the watched tree changes (hashed before
and after).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import jlora
from jlora.errors import HFError, JloraError, OutputPathError
from jlora.hf import PeftExportWarning, load, load_peft, save_merged, save_peft
from jlora.hf.io import INDEX_FILE, SINGLE_FILE

CONFIG = jlora.LoraConfig(rank=2, alpha=4, targets=["q_proj"], init="random")
LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (hidden ones too) with its content's hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "<dir>"
        for f in filenames:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def adapted():
    rng = np.random.default_rng(0)
    base = {"model": {"layers": {str(i): {"self_attn": {
        "q_proj": {"kernel": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}}}
        for i in range(2)}}}  # fmt: skip
    return base, jlora.inject(base, CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def llama(tmp_path_factory, save_hf):
    """A transformers checkpoint, jlora.hf.load read it: (model, params, hf_config, dir)."""
    path = tmp_path_factory.mktemp("llama") / "base"
    save_hf(tf.LlamaConfig(**LLAMA), path)
    model, params, hf_config = load(path)
    return model, params, hf_config, path


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The current directory, tmp_path/work, holding a user's file."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    return work


def _refused(watched: Path, name, match: str | None, save, *args, **kwargs) -> str:
    """``save(*args, **kwargs)`` raises OutputPathError naming ``name``; nothing changed."""
    before = _tree(watched)
    with pytest.raises(OutputPathError, match=match) as e:
        save(*args, **kwargs)
    assert repr(str(name)) in str(e.value), (name, str(e.value))
    assert _tree(watched) == before
    assert isinstance(e.value, HFError) and isinstance(e.value, JloraError)
    return str(e.value)


# ------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("path", [".", "", "./", Path(".")])
def test_current_directory_is_refused(adapted, llama, work, tmp_path, path):
    _, params = adapted
    here = "current directory"
    msg = _refused(tmp_path, work, here, save_peft, params, CONFIG, path)
    assert "overwrite=True" in msg and repr(str(work / "adapter")) in msg
    model, base, hf_config, _ = llama
    _refused(tmp_path, work, here, save_merged, model, base, hf_config, path)


def test_parents_of_the_current_directory_are_refused(adapted, llama, work, tmp_path):
    _, params = adapted
    model, base, hf_config, _ = llama
    parent = "parent of the current directory"
    for path in ("..", tmp_path, work.parent.parent):
        real = Path(path).resolve()
        _refused(tmp_path, real, parent, save_peft, params, CONFIG, path)
        _refused(tmp_path, real, parent, save_merged, model, base, hf_config, path)
    _refused(tmp_path, "/", "filesystem root", save_peft, params, CONFIG, "/")


def test_base_model_directory_is_refused_even_with_overwrite(adapted, tmp_path, monkeypatch):
    _, params = adapted
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    (base_dir / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for overwrite in (False, True):
        for target, base in ((base_dir, str(base_dir)), (base_dir, base_dir), ("./base", "base")):
            kw = dict(base_model_name_or_path=base, overwrite=overwrite)
            why = "base model's directory"
            _refused(tmp_path, base_dir, why, save_peft, params, CONFIG, target, **kw)


def test_a_transformers_checkpoint_jlora_did_not_write_is_refused(adapted, llama, tmp_path):
    _, params = adapted
    model, base, hf_config, base_dir = llama
    for overwrite in (False, True):
        why = "transformers checkpoint.*never writes"
        _refused(base_dir, base_dir, why, save_peft, params, CONFIG, base_dir, overwrite=overwrite)
        args = model, base, hf_config, base_dir
        _refused(base_dir, base_dir, why, save_merged, *args, overwrite=overwrite)


def test_other_files_are_refused_without_overwrite(adapted, llama, tmp_path):
    _, params = adapted
    model, base, hf_config, _ = llama
    target = tmp_path / "stuff"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    (target / "data").mkdir()
    msg = _refused(tmp_path, target, "already holds files", save_peft, params, CONFIG, target)
    assert "thesis.tex" in msg and "overwrite=True" in msg
    why = "not a merged model directory"
    _refused(tmp_path, target, why, save_merged, model, base, hf_config, target)
    # an output of the other kind is not the same kind either
    adapter = save_peft(params, CONFIG, tmp_path / "adapter")
    _refused(tmp_path, adapter, why, save_merged, model, base, hf_config, adapter)
    merged = save_merged(model, base, hf_config, tmp_path / "merged")
    _refused(tmp_path, merged, "not a PEFT adapter directory", save_peft, params, CONFIG, merged)
    # a file
    file = target / "thesis.tex"
    _refused(tmp_path, file, "not a directory", save_peft, params, CONFIG, file)


def test_a_jlora_export_that_load_read_needs_overwrite(llama, tmp_path):
    model, params, hf_config, _ = llama
    out = save_merged(model, params, hf_config, tmp_path / "merged")
    save_merged(model, params, hf_config, out)  # its own export: no overwrite needed
    load(out)  # now a base model of this process
    _refused(tmp_path, out, "jlora.hf.load read", save_merged, model, params, hf_config, out)
    save_merged(model, params, hf_config, out, overwrite=True)
    assert _names(tmp_path) == ["merged"]


def test_bad_path_types_are_refused(adapted, tmp_path):
    _, params = adapted
    for path in (None, 3, b"out", "a\0b"):
        with pytest.raises(OutputPathError, match="path must be a str or os.PathLike"):
            save_peft(params, CONFIG, path)
    for overwrite in ("yes", 1, None):
        with pytest.raises(OutputPathError, match="overwrite must be True or False"):
            save_peft(params, CONFIG, tmp_path / "a", overwrite=overwrite)
    assert _names(tmp_path) == []


# ------------------------------------------------------------------- what a save replaces


def test_overwrite_keeps_every_other_file(adapted, llama, work, tmp_path):
    base, params = adapted
    model, mparams, hf_config, _ = llama
    (work / "sub").mkdir()
    (work / "sub" / "x.bin").write_bytes(b"\1\2")
    (work / "README.md").write_text("my adapter")
    user = _tree(work)
    save_peft(params, CONFIG, ".", overwrite=True)
    save_merged(model, mparams, hf_config, "", overwrite=True)
    after = _tree(work)
    assert {k: after[k] for k in user} == user
    assert set(after) - set(user) == {*ADAPTER_FILES, "config.json", SINGLE_FILE}
    back, _ = load_peft(base, work)
    np.testing.assert_array_equal(
        back["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel_lora_b"],
        params["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel_lora_b"],
    )
    assert _names(tmp_path) == ["work"]  # no debris beside it


def test_resave_replaces_only_the_savers_files(adapted, tmp_path):
    base, params = adapted
    out = save_peft(params, CONFIG, tmp_path / "adapter")
    (out / "README.md").write_text("notes")
    other = jlora.inject(base, CONFIG, jax.random.key(1))
    save_peft(other, CONFIG, out)  # an adapter directory: no overwrite needed
    assert _names(out) == ["README.md", *ADAPTER_FILES]
    assert (out / "README.md").read_text() == "notes"
    back, _ = load_peft(base, out)
    np.testing.assert_array_equal(
        back["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"],
        other["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel_lora_a"],
    )
    assert _names(tmp_path) == ["adapter"]


def test_a_peft_written_adapter_directory_is_replaced_without_overwrite(adapted, tmp_path):
    import peft

    _, params = adapted
    hf = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**LLAMA))
    out = tmp_path / "peft_adapter"
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 8
    readme = (out / "README.md").read_text()
    save_peft(params, CONFIG, out)
    assert _names(out) == ["README.md", *ADAPTER_FILES]
    assert (out / "README.md").read_text() == readme
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 4  # jlora's


def test_stale_shards_and_index_do_not_survive(llama, tmp_path):
    model, params, hf_config, _ = llama
    out = tmp_path / "merged"
    save_merged(model, params, hf_config, out, max_shard_size="8KB")
    (out / "tokenizer.json").write_text("{}")
    shards = [n for n in _names(out) if n.startswith("model-")]
    assert len(shards) > 2 and INDEX_FILE in _names(out)
    save_merged(model, params, hf_config, out)  # one file now
    assert _names(out) == ["config.json", SINGLE_FILE, "tokenizer.json"]
    save_merged(model, params, hf_config, out, max_shard_size="20KB")  # fewer shards
    fewer = [n for n in _names(out) if n.startswith("model-")]
    assert 1 < len(fewer) < len(shards) and SINGLE_FILE not in _names(out)
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == fewer
    hf = tf.AutoModelForCausalLM.from_pretrained(out)
    want = np.asarray(params["params"]["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]).T
    got = hf.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy()
    np.testing.assert_array_equal(got, want)
    assert _names(tmp_path) == ["merged"]


def test_a_symlinked_target_writes_through_the_link(adapted, tmp_path):
    _, params = adapted
    real = tmp_path / "real" / "adapter"
    save_peft(params, CONFIG, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save_peft(params, CONFIG, link)
    assert link.is_symlink() and _names(real) == ADAPTER_FILES
    assert _names(tmp_path) == ["link", "real"] and _names(real.parent) == ["adapter"]


def test_missing_parents_are_created(adapted, tmp_path):
    _, params = adapted
    out = save_peft(params, CONFIG, tmp_path / "a" / "b" / "adapter")
    assert _names(out) == ADAPTER_FILES


# ----------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    "dtype, match",
    [
        (jnp.int8, "dtype int8 cannot hold"),
        (jnp.int32, "dtype int32 cannot hold"),
        (jnp.bool_, "dtype bool cannot hold"),
        (np.uint8, "dtype uint8 cannot hold"),
        ("float64", "dtype float64 cannot hold"),
        (True, "True is not a dtype"),
        ("fp17", "'fp17' is not a dtype"),
    ],
)
def test_save_merged_dtype_must_be_a_float_transformers_stores(llama, tmp_path, dtype, match):
    model, params, hf_config, _ = llama
    with pytest.raises(HFError, match=match) as e:
        save_merged(model, params, hf_config, tmp_path / "m", dtype=dtype)
    assert "jnp.bfloat16" in str(e.value)
    assert _names(tmp_path) == []


@pytest.mark.parametrize("size", ["5 parsecs", 0, -1, True, "0.1B", None])
def test_save_merged_max_shard_size_is_checked_first(llama, tmp_path, size):
    model, params, hf_config, _ = llama
    with pytest.raises(HFError, match="max_shard_size"):
        save_merged(model, params, hf_config, tmp_path / "m", max_shard_size=size)
    assert _names(tmp_path) == []


def test_save_merged_other_argument_errors(llama, tmp_path):
    model, params, hf_config, _ = llama
    for bad in (None, "llama", {"hidden_size": 16}):
        with pytest.raises(HFError, match="hf_config must be the config.json dict"):
            save_merged(model, params, bad, tmp_path / "m")
    ints = jax.tree.map(lambda x: x, params)
    ints["params"]["model"]["norm"]["scale"] = jnp.ones(16, jnp.int32)
    with pytest.raises(HFError, match="model.norm.scale has dtype int32"):
        save_merged(model, ints, hf_config, tmp_path / "m")
    assert _names(tmp_path) == []


def test_save_peft_argument_errors(adapted, tmp_path):
    _, params = adapted
    for kw, match in [
        (dict(base_model_name_or_path=3), "base_model_name_or_path must be a str"),
        (dict(task_type=1), "task_type must be a str"),
        (dict(model_type=["llama"]), "model_type must be a str"),
        (dict(hf_config="config.json"), "hf_config must be the config.json dict"),
    ]:
        with pytest.raises(HFError, match=match):
            save_peft(params, CONFIG, tmp_path / "a", **kw)
    assert _names(tmp_path) == []
    with pytest.warns(PeftExportWarning, match="not a local directory with a config.json"):
        out = save_peft(params, CONFIG, tmp_path / "a", base_model_name_or_path=tmp_path / "base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
