"""word2vec neighbours against an outside oracle: `Embed`'s nearest words and analogies equal gensim's.

A real server (the session's tiny repository) answers `Embed` with `nearest_k` and `analogies` over gRPC.
gensim's `KeyedVectors.most_similar` runs on the same vectors: the `wv` matrix stored in the model's
`vectors.onnx`, raw (gensim normalises them itself), without the two special rows (`<unk>`, `[MASK]`: zero
vectors the server never returns). A text's neighbours are `most_similar(positive=<its known words>)` (the
mean of unit vectors, the text's words excluded); an analogy a - b + c is
`most_similar(positive=[a, c], negative=[b])`, as the proto documents. Ranks and cosines must agree within
1e-6; two words whose cosines are within 1e-6 of each other may swap places (a float32 near-tie).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plm.api.v1 import plm_pb2 as pb

TOLERANCE = 1e-6
K = 10


def _gensim() -> Any:
    try:
        from gensim.models import KeyedVectors
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("gensim is not installed (pyproject.toml's test extras bring it)")
        pytest.skip("gensim is not installed")
    return KeyedVectors


def keyed_vectors(folder: Path) -> tuple[Any, list[str]]:
    """gensim KeyedVectors over the model's own stored vectors, and the vocabulary (ids in order)."""
    import onnx
    from onnx import numpy_helper

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    graph = onnx.load(str(folder / "vectors.onnx")).graph
    wv = next(numpy_helper.to_array(t) for t in graph.initializer if t.name == "wv")  # (V, D) raw
    assert wv.shape[0] == len(vocab)
    keep = [i for i, w in enumerate(vocab) if w not in ("<unk>", "[MASK]")]
    kv = _gensim()(vector_size=wv.shape[1])
    kv.add_vectors([vocab[i] for i in keep], wv[keep])
    return kv, vocab


def agree(ours: list[tuple[str, float]], theirs: list[tuple[str, float]], what: str) -> None:
    """Same words at the same ranks (near-ties may swap) and cosines within TOLERANCE."""
    assert len(ours) == K, f"{what}: {len(ours)} answers, not {K}"
    cos = dict(theirs)
    for rank, ((word, c), (their_word, their_c)) in enumerate(zip(ours, theirs, strict=False)):
        assert word in cos, f"{what}: rank {rank} is {word!r}, not among gensim's top {len(theirs)}: {theirs[:K]}"
        assert abs(c - cos[word]) <= TOLERANCE, f"{what}: cosine of {word!r} {c} vs gensim's {cos[word]}"
        assert word == their_word or abs(c - their_c) <= TOLERANCE, \
            f"{what}: rank {rank} is {word!r} ({c}), gensim's is {their_word!r} ({their_c})"


@pytest.mark.parametrize("model", ["word2vec-skipgram", "word2vec-cbow"])
def test_nearest_words_and_analogies_equal_gensim(client: Any, tiny_repo: Path, model: str) -> None:
    kv, vocab = keyed_vectors(tiny_repo / model)
    words = [w for w in vocab[2:400] if w.isalpha()]  # frequent words: ids follow descending count
    rng = random.Random(18)
    texts = [[w] for w in rng.sample(words, 12)] + [rng.sample(words, n) for n in (2, 3, 5)]
    texts.append(["king", "zzqxunseen", "queen"])  # an unknown word: no vector, left out of the mean
    texts.append(["the", "the", "king"])  # a repeated word counts twice in the mean, as in gensim
    triples = [tuple(rng.sample(words, 3)) for _ in range(12)] + [("king", "man", "woman")]
    triples = [t for t in triples if all(w in kv.key_to_index for w in t)]
    reply = client.stub.Embed(pb.EmbedRequest(model=model, texts=[" ".join(t) for t in texts], nearest_k=K,
                                              analogies=[pb.Analogy(a=a, b=b, c=c) for a, b, c in triples]))

    for text, emb in zip(texts, reply.embeddings, strict=True):
        known = [w for w in text if w in kv.key_to_index]
        theirs = kv.most_similar(positive=known, topn=K + 5)
        agree([(n.word, n.cosine) for n in emb.nearest], theirs, f"nearest of {text}")
    for (a, b, c), res in zip(triples, reply.analogies, strict=True):
        assert (res.query.a, res.query.b, res.query.c) == (a, b, c)
        theirs = kv.most_similar(positive=[a, c], negative=[b], topn=K + 5)
        agree([(n.word, n.cosine) for n in res.answers], theirs, f"{a} - {b} + {c}")
    assert np.isfinite([n.cosine for e in reply.embeddings for n in e.nearest]).all()
