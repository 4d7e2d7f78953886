"""Training data for the command line: files in, tokenized arrays and batches out.

* causal-lm: text files (each one document) or JSONL records with a text field, or a
  prompt and a completion field (loss on the completion only); packed into full sequences
  (EOS between documents) or one right-padded sequence per document.
* embedding: JSONL records with a query and a document field, each padded to max_length.

Everything is tokenized once, up front, with the model directory's own tokenizer. The
training order is a pure function of ``(seed, position)`` (a new permutation every epoch),
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlora.errors import DataError

Arrays = dict[str, np.ndarray]


def load_tokenizer(model_dir: str) -> Any:
    """The tokenizer saved in a transformers model directory."""
    from transformers import AutoTokenizer

    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"{model_dir!r} holds no tokenizer (tokenizer.json, vocab.txt, ...): "
                        "save one there with tokenizer.save_pretrained(model_dir).")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise DataError(f"the tokenizer in {model_dir!r} does not load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-save it with "
                        "tokenizer.save_pretrained(model_dir).") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja")


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copies the tokenizer files of model dir ``src`` that ``dst`` lacks (a merged export
    then loads on its own); each file lands whole (copy, then rename)."""
    import os
    import shutil

    copied = []
    for name in TOKENIZER_FILES:
        source, target = Path(src) / name, Path(dst) / name
        if source.is_file() and not target.exists():
            tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
            copied.append(name)
    return copied


def _files(paths: Sequence[str], what: str) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"{what} directory {str(p)!r} holds no files.")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{what} file {str(p)!r} does not exist; give .txt or .jsonl files "
                            "(or directories of them).")
    return out


def _records(file: Path, fields: Sequence[str]) -> Iterator[dict[str, str]]:
    """The JSONL records of ``file`` with ``fields`` checked to be strings."""
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{n} is not valid JSON ({e.msg}); each line of a "
                                ".jsonl file must be one JSON object.") from None
            if not isinstance(rec, dict):
                raise DataError(f"{file}:{n} is a JSON {type(rec).__name__}, not an object.")
            for field in fields:
                if field not in rec:
                    raise DataError(f"{file}:{n} has no field {field!r} (it has "
                                    f"{sorted(rec)}); name the right one with the "
                                    f"--data.*-field flags.")
                if not isinstance(rec[field], str):
                    raise DataError(f"{file}:{n}: field {field!r} is a "
                                    f"{type(rec[field]).__name__}, not text.")
            yield {k: rec[k] for k in fields}


def read_texts(paths: Sequence[str], fields: Sequence[str], what: str) -> list[dict[str, str]]:
    """One dict per document: ``{field: text}``; a non-JSONL file is one document whose text
    is the first field. Raises :class:`DataError` for missing or empty data."""
    if not paths:
        raise DataError(f"no {what} data: give --data.{what} FILE [FILE ...].")
    out: list[dict[str, str]] = []
    for file in _files(paths, what):
        if file.suffix == ".jsonl":
            got = list(_records(file, fields))
        else:
            if len(fields) != 1:
                raise DataError(f"{file}: this task needs JSONL records with fields "
                                f"{list(fields)}, not a plain text file.")
            try:
                text = file.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{file} is not UTF-8 text.") from None
            got = [{fields[0]: text}] if text.strip() else []
        if not got:
            raise DataError(f"{what} file {str(file)!r} is empty.")
        out += got
    return out


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def causal_lm_arrays(docs: list[dict[str, str]], tokenizer: Any, *, max_length: int,
                     packing: bool, text_field: str, prompt_field: str | None,
                     completion_field: str) -> Arrays:
    """``input_ids``, ``attention_mask`` and ``loss_mask`` (int32, (sequences, max_length)).

    ``loss_mask`` marks the tokens the loss predicts: all of them, or with ``prompt_field``
    only the completion's (and the EOS after it).
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    seqs: list[tuple[list[int], list[int]]] = []
    for d in docs:
        if prompt_field is None:
            ids = tokenizer(d[text_field], verbose=False)["input_ids"]
            mask = [1] * len(ids)
        else:
            p = tokenizer(d[prompt_field], verbose=False)["input_ids"]
            c = tokenizer(d[completion_field], add_special_tokens=False,
                          verbose=False)["input_ids"]
            ids, mask = p + c, [0] * len(p) + [1] * len(c)
        if eos is not None and (not ids or ids[-1] != eos):
            ids, mask = ids + [eos], mask + [1]
        seqs.append((ids, mask))
    pad = _pad_id(tokenizer)
    if packing:
        flat = [i for ids, _ in seqs for i in ids]
        flat_mask = [m for _, mask in seqs for m in mask]
        n = max(1, math.ceil(len(flat) / max_length))
        ids = np.full((n, max_length), pad, np.int32)
        att = np.zeros((n, max_length), np.int32)
        loss = np.zeros((n, max_length), np.int32)
        for r in range(n):
            chunk = slice(r * max_length, (r + 1) * max_length)
            k = len(flat[chunk])
            ids[r, :k], att[r, :k], loss[r, :k] = flat[chunk], 1, flat_mask[chunk]
    else:
        n = len(seqs)
        ids = np.full((n, max_length), pad, np.int32)
        att = np.zeros((n, max_length), np.int32)
        loss = np.zeros((n, max_length), np.int32)
        for r, (s, m) in enumerate(seqs):
            k = min(len(s), max_length)
            ids[r, :k], att[r, :k], loss[r, :k] = s[:k], 1, m[:k]
    if not (loss[:, 1:] * att[:, 1:]).any():
        raise DataError("the data leaves no token to predict (completions empty or cut off "
                        "by --data.max-length).")
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss}


def pair_arrays(docs: list[dict[str, str]], tokenizer: Any, *, max_length: int,
                query_field: str, document_field: str) -> Arrays:
    """``{query,document}_{input_ids,attention_mask,token_type_ids}`` (int32, (pairs, L))."""
    out: Arrays = {}
    for prefix, field in (("query", query_field), ("document", document_field)):
        enc = encode(tokenizer, [d[field] for d in docs], max_length)
        out.update({f"{prefix}_{k}": v for k, v in enc.items()})
    return out


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> Arrays:
    """Texts padded (and cut) to ``max_length``: input_ids, attention_mask, token_type_ids."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")
    ids = enc["input_ids"].astype(np.int32)
    types = enc.get("token_type_ids")
    return {"input_ids": ids, "attention_mask": enc["attention_mask"].astype(np.int32),
            "token_type_ids": np.zeros_like(ids) if types is None else types.astype(np.int32)}


def rows(arrays: Arrays) -> int:
    return len(next(iter(arrays.values())))


def batch_source(arrays: Arrays, batch_size: int, seed: int) -> Callable[[int], Arrays]:
    """``source(position)``: the training batch ``position``, a pure function of it.

    Each epoch is a fresh permutation (seeded by ``(seed, epoch)``); the last partial batch
    of an epoch is dropped.
    """
    n = rows(arrays)
    if n < batch_size:
        raise DataError(f"the training data has {n} examples, fewer than --train.batch-size "
                        f"{batch_size}: lower the batch size or add data.")
    per_epoch = n // batch_size

    def source(position: int) -> Arrays:
        epoch, i = divmod(int(position), per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[i * batch_size:(i + 1) * batch_size]
        return {k: v[idx] for k, v in arrays.items()}

    return source


def eval_batches(arrays: Arrays, batch_size: int) -> Iterator[tuple[Arrays, int]]:
    """``(batch, real_rows)`` in order; the last batch is padded with all-zero rows."""
    n = rows(arrays)
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
        real = rows(batch)
        if real < batch_size:
            batch = {k: np.concatenate([v, np.zeros((batch_size - real, *v.shape[1:]), v.dtype)])
                     for k, v in batch.items()}
        yield batch, real


def real_tokens(batch: Arrays) -> int:
    """Real (unpadded) tokens in a batch: the sum of its attention masks."""
    return int(sum(v.sum() for k, v in batch.items() if k.endswith("attention_mask")))
