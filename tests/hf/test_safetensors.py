"""safetensors through its library: bad files and index files give HFErrors naming the file
and change nothing; what jlora writes the library reads back; the gaps that keep code in
jlora.hf.io; a property test over generated headers."""

import hashlib
import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers as tf
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jlora.errors import HFError, JloraError
from jlora.hf.io import (
    INDEX_FILE,
    SINGLE_FILE,
    LazyTensor,
    checkpoint_index,
    iter_tensors,
    read_header,
    read_tensor,
    write_safetensors,
    write_weights,
)
from jlora.hf.load import load

# The dtypes jlora reads, as the format names them: an oracle independent of jlora.hf.io.
DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPES = {code: np.dtype(t) for code, t in DTYPES.items()}


def _encode(header, data=b"", n=None):
    """A safetensors file: 8-byte little-endian header length, the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if n is None else n).to_bytes(8, "little") + raw + data


def _entry(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _digest(root):
    """Every file, link and folder under root with its content hash or link target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder, name)
            if p.is_symlink():
                out[p] = f"-> {p.readlink()}"
            elif p.is_file():
                out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[p] = "dir"
    return out


def _refused(fn, file, root, match):
    """fn() raises an HFError naming ``file`` and matching ``match``; nothing under root moved."""
    before = _digest(root)
    with pytest.raises(HFError, match=match) as e:
        fn()
    assert isinstance(e.value, JloraError)
    assert str(file) in str(e.value)
    assert _digest(root) == before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, save_hf):
    """A tiny llama saved by transformers in shards (``sharded``) and as one file (``single``)."""
    cfg = tf.LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    single = tmp_path_factory.mktemp("single")
    model = save_hf(cfg, single)
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("model-*.safetensors"))) >= 2
    return {"single": single, "sharded": sharded}


@pytest.fixture
def model_dir(tiny, tmp_path):
    """``model_dir(kind)``: a fresh copy of a tiny checkpoint under tmp_path / "model"."""
    return lambda kind: shutil.copytree(tiny[kind], tmp_path / "model")


# ----------------------------------------------------------------------- bad safetensors files

F32x2 = b"\x00\x00\x80\x3f" * 2  # two float32 ones
BAD_FILES = {
    # The bug: b's offsets are a's, so one layer loaded the other's weights.
    "overlapping offsets": (
        _encode({"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [2], [0, 8])}, F32x2),
        "overlap",
    ),
    "partly overlapping offsets": (
        _encode({"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [2], [4, 12])}, F32x2 * 2),
        "overlap",
    ),
    "gap between tensors": (
        _encode({"a": _entry("F32", [1], [0, 4]), "b": _entry("F32", [1], [8, 12])}, F32x2 * 2),
        "gap",
    ),
    "float shape": (_encode({"a": _entry("F32", [2.5], [0, 8])}, F32x2), "floating point"),
    "integral float shape": (_encode({"a": _entry("F32", [2.0], [0, 8])}, F32x2), "floating"),
    "negative shape": (_encode({"a": _entry("F32", [-2], [0, 8])}, F32x2), "-2"),
    "negative offset": (_encode({"a": _entry("F32", [2], [-8, 0])}, F32x2), "-8"),
    "offset past the data": (_encode({"a": _entry("F32", [2], [0, 16])}, F32x2), "does not fit"),
    "offset too large for the format": (
        _encode({"a": _entry("F32", [2], [0, 2**70])}, F32x2),
        "does not parse",
    ),
    "bytes that do not fit the shape": (
        _encode({"a": _entry("F32", [3], [0, 8])}, F32x2),
        "does not fit its shape",
    ),
    "unknown dtype": (_encode({"a": _entry("F33", [2], [0, 8])}, F32x2), "F33"),
    "dtype jlora does not read": (
        _encode({"a": _entry("F8_E8M0", [8], [0, 8])}, F32x2),
        "dtype F8_E8M0, which jlora does not read",
    ),
    "a 10**12-element tensor": (
        _encode({"a": _entry("F32", [10**6, 10**6], [0, 4 * 10**12])}, F32x2),
        "size does not match",
    ),
    "shape overflow": (_encode({"a": _entry("F32", [2**40, 2**40], [0, 8])}, F32x2), "overflow"),
    "header length past the end": (_encode({}, n=1000), "header length"),
    "header length of 2**63": (_encode({}, n=2**63), "too large"),
    "truncated data": (_encode({"a": _entry("F32", [2], [0, 8])}, F32x2[:5]), "cut short"),
    "bytes appended": (_encode({"a": _entry("F32", [2], [0, 8])}, F32x2 + b"\0"), "appended"),
    "empty file": (b"", "too short"),
    "shorter than the length": (b"\x10\x00\x00", "too short"),
    "non-object header": (_encode(b"[1, 2]"), "does not parse"),
    "string header": (_encode(b'"model"'), "does not parse"),
    "junk header": (_encode(b"{not json}"), "does not parse"),
    "header not utf-8": (_encode(b'{"\xff": 1}'), "UTF-8"),
    "entry missing data_offsets": (
        _encode({"a": {"dtype": "F32", "shape": [2]}}, F32x2),
        "missing field `data_offsets`",
    ),
    "entry not an object": (_encode({"a": [1, 2]}, F32x2), "does not parse"),
    "metadata not str -> str": (_encode({"__metadata__": {"format": 1}}), "does not parse"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors_file_is_an_hferror(case, model_dir):
    path = model_dir("single")
    file = path / SINGLE_FILE
    content, match = BAD_FILES[case]
    file.write_bytes(content)
    _refused(lambda: load(path), file, path, match)
    _refused(lambda: list(iter_tensors(path)), file, path, match)


def test_overlapping_offsets_no_longer_hand_one_tensor_anothers_data(tmp_path):
    a, b = np.ones(2, np.float32), np.full(2, 7, np.float32)
    file = tmp_path / SINGLE_FILE
    header = {"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [2], [0, 8])}
    file.write_bytes(_encode(header, a.tobytes() + b.tobytes()))
    _refused(lambda: read_header(file), file, tmp_path, r"invalid offset for tensor `[ab]`")


def test_absent_or_unreadable_file_is_an_hferror(tmp_path):
    _refused(lambda: read_header(tmp_path / "none.safetensors"), tmp_path, tmp_path, "cannot be")
    (tmp_path / "dir.safetensors").mkdir()
    _refused(lambda: read_header(tmp_path / "dir.safetensors"), tmp_path, tmp_path, "cannot be")


def test_file_changed_after_its_header_was_read(tmp_path):
    file = tmp_path / SINGLE_FILE
    for dtype in (np.float32, ml_dtypes.float8_e4m3fn):  # through the library, and not
        write_safetensors(file, {"a": np.zeros(2, dtype), "b": np.ones(3, dtype)})
        infos = read_header(file)
        write_safetensors(file, {"a": np.zeros(2, dtype), "b": np.ones(4, dtype)})
        _refused(lambda b=infos["b"]: read_tensor(b), file, tmp_path, "changed since its header")
        write_safetensors(file, {"a": np.zeros(2, dtype)})
        _refused(lambda b=infos["b"]: read_tensor(b), file, tmp_path, "changed since")


# ----------------------------------------------------------------------------- index files


def _first_shard(path):
    return sorted(path.glob("model-*.safetensors"))[0]


def _rename_shard(path, old, new):
    """The index at path names shard ``new`` wherever it named ``old``."""
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"] = {k: new if v == old else v for k, v in index["weight_map"].items()}
    (path / INDEX_FILE).write_text(json.dumps(index))


def test_index_naming_a_shard_through_dotdot_is_refused(model_dir, tmp_path):
    path = model_dir("sharded")
    outside = shutil.copy(_first_shard(path), tmp_path / "outside.safetensors")
    _rename_shard(path, _first_shard(path).name, "../outside.safetensors")
    assert (path / "../outside.safetensors").resolve() == outside.resolve()
    _refused(lambda: load(path), path / INDEX_FILE, tmp_path, "outside the model directory")


def test_index_naming_a_shard_by_absolute_path_is_refused(model_dir, tmp_path):
    path = model_dir("sharded")
    outside = shutil.copy(_first_shard(path), tmp_path / "outside.safetensors")
    _rename_shard(path, _first_shard(path).name, str(outside))
    _refused(lambda: load(path), path / INDEX_FILE, tmp_path, "outside the model directory")


def test_index_naming_a_symlink_out_of_the_folder_is_refused(model_dir, tmp_path):
    path = model_dir("sharded")
    shard = _first_shard(path)
    outside = shutil.copy(shard, tmp_path / "outside.safetensors")
    shard.unlink()
    shard.symlink_to(outside)
    _refused(lambda: load(path), path / INDEX_FILE, tmp_path, "a link to .* outside the model")


def test_symlinks_inside_the_folder_and_the_hub_cache_layout_load(tiny, tmp_path):
    """Links that stay inside the folder load, as does the Hugging Face cache's layout
    (snapshots/<revision>/<file> -> ../../blobs/<hash>)."""
    want = dict(iter_tensors(tiny["sharded"]))
    inside = shutil.copytree(tiny["sharded"], tmp_path / "inside")
    shard = _first_shard(inside)
    shard.rename(inside / "blob")
    shard.symlink_to("blob")
    repo = tmp_path / "models--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, p in enumerate(sorted(tiny["sharded"].iterdir())):
        shutil.copy(p, repo / "blobs" / f"{i:040x}")
        (snapshot / p.name).symlink_to(f"../../blobs/{i:040x}")
    for path in (inside, snapshot):
        got = dict(iter_tensors(path))
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    load(snapshot)


BAD_INDEXES = {
    "not JSON": (lambda i: "{oops", "not valid JSON"),
    "a list": (lambda i: [i], "field 'weight_map' must be .*got list"),
    "no weight_map": (lambda i: {"metadata": i["metadata"]}, "field 'weight_map'.*NoneType"),
    "weight_map a list": (lambda i: {**i, "weight_map": list(i["weight_map"])}, "got list"),
    "weight_map a string": (lambda i: {**i, "weight_map": "model.safetensors"}, "got str"),
    "weight_map empty": (lambda i: {**i, "weight_map": {}}, "non-empty"),
    "a shard named by a number": (
        lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": 1}},
        "names shard 1, which is not a file name",
    ),
    "a shard named ''": (
        lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": ""}},
        "not a file name",
    ),
    "an absent shard": (
        lambda i: {**i, "weight_map": {**i["weight_map"], "model.norm.weight": "gone.safetensors"}},
        "names shard 'gone.safetensors', which is absent",
    ),
    "a shard that lacks the tensor": (
        lambda i: {**i, "weight_map": {**i["weight_map"], "extra.weight": _any_shard(i)}},
        "puts tensor 'extra.weight' in 'model-.*', which lacks it",
    ),
}


def _any_shard(index):
    return next(iter(index["weight_map"].values()))


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_bad_index_is_an_hferror(case, model_dir):
    path = model_dir("sharded")
    edit, match = BAD_INDEXES[case]
    index = json.loads((path / INDEX_FILE).read_text())
    new = edit(index)
    (path / INDEX_FILE).write_text(new if isinstance(new, str) else json.dumps(new))
    _refused(lambda: load(path), path / INDEX_FILE, path, match)
    _refused(lambda: checkpoint_index(path), path / INDEX_FILE, path, match)


def test_index_with_a_corrupt_shard_names_the_shard(model_dir):
    path = model_dir("sharded")
    shard = _first_shard(path)
    shard.write_bytes(shard.read_bytes()[:-3])
    _refused(lambda: load(path), shard, path, "cut short")


# ---------------------------------------------- what the library reads back of what we write


def _written():
    rng = np.random.default_rng(0)
    return {
        "f32": rng.normal(size=(3, 5)).astype(np.float32),
        "bf16": rng.normal(size=(4, 2)).astype(ml_dtypes.bfloat16),
        "f16": np.array([1.5, -0.0, np.inf], np.float16),
        "f8": rng.normal(size=(6,)).astype(ml_dtypes.float8_e4m3fn),
        "f8e5": rng.normal(size=(2, 2)).astype(ml_dtypes.float8_e5m2),
        "i64": np.array([-(2**62), 3], np.int64),
        "u8": np.arange(7, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.float64(2.25),
        "empty": np.zeros((0, 3), np.int32),
        "lazy": LazyTensor(
            (2, 3), np.dtype(np.int16), lambda: np.arange(6, dtype=np.int16).reshape(2, 3)
        ),
    }


def _value(t):
    return t.load() if isinstance(t, LazyTensor) else np.asarray(t)


def _same(got, want):
    """Equal shape, dtype and bits."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got, want)
    assert got.tobytes() == want.tobytes()


def _via_torch(t):
    """A tensor the library read for torch, as numpy (float8 through its bits)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        kind = ml_dtypes.float8_e4m3fn if t.dtype == torch.float8_e4m3fn else ml_dtypes.float8_e5m2
        return t.view(torch.uint8).numpy().view(kind)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_library_reads_exactly_what_we_write(tmp_path):
    tensors = _written()
    file = tmp_path / "x.safetensors"
    size = write_safetensors(file, tensors, metadata={"format": "pt", "note": "jlora"})
    assert size == sum(_value(t).nbytes for t in tensors.values())
    with safetensors.safe_open(file, framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "note": "jlora"}
        assert f.offset_keys() == list(tensors)
        for name, t in tensors.items():
            if not name.startswith("f8"):
                _same(f.get_tensor(name), _value(t))
    with safetensors.safe_open(file, framework="pt") as f:
        for name, t in tensors.items():
            _same(_via_torch(f.get_tensor(name)), _value(t))
    for name, info in read_header(file).items():
        _same(read_tensor(info), _value(tensors[name]))


def test_library_reads_the_shards_and_index_we_write(tmp_path):
    tensors = _written()
    files = write_weights(tmp_path, tensors, max_shard_size=40)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert files[-1] == INDEX_FILE and set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(_value(t).nbytes for t in tensors.values())
    seen = {}
    for shard in files[:-1]:
        with safetensors.safe_open(tmp_path / shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard
                seen[name] = _via_torch(f.get_tensor(name))
    assert seen.keys() == tensors.keys()
    for name, t in tensors.items():
        _same(seen[name], _value(t))
        _same(dict(iter_tensors(tmp_path))[name], _value(t))


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"a": np.zeros(2, np.float32)}, {"format": 1}, "metadata must map str to str"),
        ({"__metadata__": np.zeros(2, np.float32)}, None, "cannot name a tensor"),
        ({"a": np.zeros(2, np.complex64)}, None, "safetensors cannot store"),
    ],
)
def test_writer_refuses_what_the_library_would_not_read(tmp_path, tensors, metadata, match):
    with pytest.raises(HFError, match=match):
        write_safetensors(tmp_path / "x.safetensors", tensors, metadata)


def test_library_numpy_framework_reads_bf16_as_ml_dtypes(tmp_path):
    file = tmp_path / "x.safetensors"
    write_safetensors(file, {"b": np.array([1.5, -2.0], ml_dtypes.bfloat16)})
    with safetensors.safe_open(file, framework="numpy") as f:
        assert f.get_tensor("b").dtype == np.dtype(ml_dtypes.bfloat16)


def test_library_numpy_framework_cannot_read_float8(tmp_path):
    """Why jlora.hf.io reads float8 data itself: the library's numpy framework looks the
    dtype up as numpy.float8_e4m3fn, which numpy lacks. If this starts to pass through the
    library, drop jlora.hf.io's float8 path."""
    file = tmp_path / "x.safetensors"
    want = np.array([0.5, -3.0, 448.0], ml_dtypes.float8_e4m3fn)
    write_safetensors(file, {"f8": want})
    with safetensors.safe_open(file, framework="numpy") as f:
        assert f.get_slice("f8").get_dtype() == "F8_E4M3"  # the header is fine
        with pytest.raises(AttributeError, match="float8_e4m3fn"):
            f.get_tensor("f8")
    with safetensors.safe_open(file, framework="pt") as f:
        _same(_via_torch(f.get_tensor("f8")), want)  # jlora reads what torch reads
    _same(read_tensor(read_header(file)["f8"]), want)


@pytest.mark.slow
def test_library_writer_holds_every_tensor_ours_holds_one(tmp_path):
    """Why write_safetensors stays hand-written: the library's writer takes a pointer to every
    tensor of the file in one call (save_file(dict of arrays) -> serialize_file(TensorSpecs)),
    so a 256 MiB shard is all in memory at once; ours produces each LazyTensor as it writes."""
    n, shape = 16, (2048, 2048)  # 16 tensors of 16 MiB
    tensor_bytes = 4 * shape[0] * shape[1]
    make = lambda i: np.full(shape, i, np.float32)  # noqa: E731
    lazy = {f"t{i}": LazyTensor(shape, np.dtype(np.float32), lambda i=i: make(i)) for i in range(n)}

    tracemalloc.start()
    try:
        write_safetensors(tmp_path / "ours.safetensors", lazy)
        _, ours = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        safetensors.numpy.save_file({k: t.load() for k, t in lazy.items()},
                                    tmp_path / "library.safetensors")  # fmt: skip
        _, library = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ours < 2 * tensor_bytes, ours
    assert library >= n * tensor_bytes, library
    with (
        safetensors.safe_open(tmp_path / "ours.safetensors", framework="numpy") as ours,
        safetensors.safe_open(tmp_path / "library.safetensors", framework="numpy") as library,
    ):
        assert ours.offset_keys() == list(lazy)  # the library sorts by dtype, then by name
        assert sorted(library.offset_keys()) == sorted(lazy)
        for name in lazy:
            _same(ours.get_tensor(name), library.get_tensor(name))


# --------------------------------------------------------------- property: any header at all

LIBRARY_ONLY = ["F8_E8M0", "F8_E4M3FNUZ", "C64", "F4"]  # the library knows them, jlora does not
JUNK_DTYPES = ["F33", "f32", ""]
BAD_DIMS = st.one_of(
    st.integers(-3, -1),
    st.integers(10**12, 2**70),
    st.floats(0, 8, allow_nan=False),
    st.sampled_from(["2", None, True]),
)
U64 = 2**64


def _size(code, shape):
    """Bytes a (dtype, shape) takes, when both are well formed; else None."""
    if code not in DTYPES or not isinstance(shape, list):
        return None
    if not all(type(d) is int and d >= 0 for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n * DTYPES[code].itemsize


def _mostly(draw, good, bad):
    """``good`` 7 times in 8, else an example of ``bad`` (shrinking goes towards good)."""
    return draw(bad) if draw(st.integers(0, 7)) == 7 else good


@st.composite
def safetensors_files(draw):
    """The bytes of a file that is usually well formed, often with something wrong."""
    header, offset = {}, 0
    for name in draw(st.lists(st.text("ab.0", max_size=4), unique=True, max_size=4)):
        code = _mostly(draw, draw(st.sampled_from(list(DTYPES))),
                       st.sampled_from(LIBRARY_ONLY + JUNK_DTYPES))  # fmt: skip
        shape = _mostly(
            draw,
            draw(st.lists(st.integers(0, 4), max_size=3)),
            st.lists(st.integers(0, 4) | BAD_DIMS, min_size=1, max_size=3)
            | st.sampled_from([[10**6, 10**6], [0, 2**70], [2**40, 2**40, 0], "x", 5]),
        )
        size = _size(code, shape)
        size = draw(st.integers(0, 64)) if size is None else size
        offsets = _mostly(
            draw,
            [offset, offset + size],
            st.lists(st.integers(-2, 2 * offset + 70), min_size=2, max_size=2)  # overlaps too
            | st.sampled_from([[0, size], [offset, offset + size + 1], [offset, 2**64 + 1]])
            | st.sampled_from([[offset], [float(offset), offset + size], "0-4"]),
        )
        entry = {"dtype": code, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 15)) == 15:
            entry.pop(draw(st.sampled_from(list(entry))))
        header[name] = entry
        offset += size
    meta = draw(st.sampled_from([None, None, {"format": "pt"}, {"format": 1}, ["pt"], "pt"]))
    if meta is not None:
        header["__metadata__"] = meta
    raw = _mostly(
        draw,
        json.dumps(dict(draw(st.permutations(list(header.items()))))).encode(),
        st.sampled_from([b"[]", b'"x"', b"{", b"{}", b"\xff{}", b"{" + b'"a":' * 3])
        | st.binary(max_size=24),
    ) + b" " * draw(st.integers(0, 7))  # fmt: skip
    n = _mostly(draw, len(raw), st.sampled_from([len(raw) - 1, len(raw) + 1, 0, 10**6, 2**63]))
    data_len = offset if offset <= 4096 else draw(st.integers(0, 4096))
    data_len = max(0, data_len + _mostly(draw, 0, st.sampled_from([-1, 1, 8])))
    data = draw(st.binary(min_size=data_len, max_size=data_len))
    return n.to_bytes(8, "little") + raw + data


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _reject(constant):
    raise ValueError(constant)


def _encoded(content):
    """What a file encodes by the format's rules, {name: array}; None if it breaks a rule.

    An independent reading of the spec (little-endian u64 length, a UTF-8 JSON object of
    entries and optional str -> str metadata, integer shapes and offsets in the u64 range,
    byte ranges that tile the data exactly), restricted to the dtypes jlora reads.
    """
    if len(content) < 8:
        return None
    n = int.from_bytes(content[:8], "little")
    if 8 + n > len(content) or n > 100_000_000:
        return None
    try:
        header = json.loads(
            content[8 : 8 + n].decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject,
        )
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    if not isinstance(header, dict):
        return None
    meta = header.pop("__metadata__", None)
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
    ):
        return None
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            return None
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            return None
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < U64 for d in shape):
            return None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return None
        if not all(type(o) is int and 0 <= o < U64 for o in offsets):
            return None
        elements = 1
        for d in shape:  # the library multiplies in order and refuses any u64 overflow
            elements *= d
            if elements >= U64:
                return None
        if elements * DTYPES[code].itemsize * 8 >= U64:
            return None
        spans.append((tuple(offsets), name, code, tuple(shape)))
    end, out = 0, {}
    data = content[8 + n :]
    for (start, stop), name, code, shape in sorted(spans, key=lambda s: s[0]):
        if start != end or stop - start != _size(code, list(shape)) or stop > len(data):
            return None  # a gap, a size that does not fit the shape, or data past the end
        out[name] = np.frombuffer(data[start:stop], DTYPES[code]).reshape(shape)
        end = stop
    return out if end == len(data) else None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("property")


@settings(
    max_examples=200,
    deadline=1000,  # ms per example: a header claiming 10**12 elements must not allocate
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(content=safetensors_files())
def test_any_file_loads_its_values_or_raises_hferror(scratch, content):
    (scratch / SINGLE_FILE).write_bytes(content)
    want = _encoded(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        got = dict(iter_tensors(scratch))
    except HFError as e:
        assert str(scratch / SINGLE_FILE) in str(e)
        assert want is None, f"a well-formed file was refused: {e}"
        event("refused")
        return
    finally:
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert seconds < 1 and peak < 2**20 + 4 * len(content), (seconds, peak)
    assert want is not None, "a malformed file loaded"
    event(f"loaded {len(want)} tensors")
    assert got.keys() == want.keys()
    for name in want:
        _same(got[name], want[name])
