"""Embed: pooled and per-token vectors of texts; nearest words and analogies over static word vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from plm.service.errors import FailedPrecondition, InvalidArgument
from plm.service.families.base import Encoded, ModelAdapter
from plm.service.families.capabilities import Embedder
from plm.service.tasks.common import encode_checked

POOL_MEAN, POOL_CLS, POOL_NONE = "mean", "cls", "none"
POOL_DEFAULT = "default"  # the model's own: its manifest's `embedding` section, else mean


@dataclass(frozen=True)
class EmbedParams:
    texts: tuple[str, ...]
    pooling: str = POOL_DEFAULT
    normalize: bool = False
    layer_weights: tuple[float, ...] | None = None
    nearest_k: int = 0
    analogies: tuple[tuple[str, str, str], ...] = ()
    include_tokens: bool = False


@dataclass(frozen=True)
class EmbedResult:
    text: str
    vector: np.ndarray | None  # (D,)
    tokens: tuple[tuple[str, np.ndarray, bool], ...]  # (token, (D,), oov)
    nearest: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class EmbedResponse:
    dimension: int
    embeddings: tuple[EmbedResult, ...]
    analogies: tuple[tuple[tuple[str, str, str], tuple[tuple[str, float], ...]], ...]


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def _nearest(matrix: np.ndarray, query: np.ndarray, exclude: set[int], k: int,
             model: ModelAdapter) -> tuple[tuple[str, float], ...]:
    cos = matrix @ _unit(query).astype(matrix.dtype)  # (V,)
    cos[list(exclude)] = -np.inf
    cos[model.never_generate_mask()] = -np.inf
    top = np.argpartition(-cos, min(k, cos.size - 1))[:k]
    top = top[np.argsort(-cos[top], kind="stable")]
    return tuple((model.token_text(int(i)), float(cos[i])) for i in top if np.isfinite(cos[i]))


def _truncated(enc: Encoded, n: int) -> Encoded:
    """The first n tokens of `enc` (what a truncating tokenizer gives; the last word may lose pieces)."""
    if len(enc.ids) <= n:
        return enc
    words = enc.word_index[n - 1] + 1 if n else 0
    return Encoded(enc.ids[:n], enc.tokens[:n], enc.word_index[:n], enc.words[:words], enc.oov[:n])


async def embed(model: ModelAdapter, params: EmbedParams, deadline: float | None) -> EmbedResponse:
    embedder = Embedder.of(model)
    matrix = embedder.word_vectors()
    if (params.nearest_k or params.analogies) and matrix is None:
        raise FailedPrecondition(
            f"model {model.name!r} ({model.family}) has no static word vectors: nearest_k and analogies need a "
            "word2vec model"
        )
    # An imported sentence-transformers model brings its pooling, normalisation and truncation (its manifest's
    # `embedding`, a section the schema keeps in `extra`); the default pooling is its, and its mean counts the
    # specials, as the checkpoint's own does.
    own = model.spec.extra.get("embedding") or {}
    pooling, normalize, specials = params.pooling, params.normalize, False
    if pooling == POOL_DEFAULT:
        pooling, specials = str(own.get("pooling", POOL_MEAN)), bool(own.get("specials", False))
        normalize = normalize or bool(own.get("normalize", False))
    truncate = bool(own.get("truncate", False))
    encoded = encode_checked(model, params.texts, "texts", reserve=None if truncate else 0)
    if truncate:
        encoded = [_truncated(e, model.context_budget) for e in encoded]
    vectors = await embedder.embed([e.ids for e in encoded], params.layer_weights, deadline) if encoded else []
    dim = 0
    results = []
    for text, enc, tv in zip(params.texts, encoded, vectors, strict=True):
        dim = int(tv.tokens.shape[1])
        pooled: np.ndarray | None = None
        if pooling == POOL_MEAN and specials and tv.mean_all is not None:
            pooled = tv.mean_all
        elif pooling == POOL_CLS:
            if tv.cls is None:
                raise InvalidArgument("pooling", f"POOLING_CLS needs a [CLS] token; model {model.name!r} has none")
            pooled = tv.cls
        elif pooling == POOL_MEAN:
            keep = ~np.asarray(enc.oov, dtype=bool)
            pooled = tv.tokens[keep].mean(axis=0) if keep.any() else np.zeros(dim, dtype=np.float32)
        if normalize and pooled is not None:
            pooled = _unit(pooled)
        tokens: tuple[tuple[str, np.ndarray, bool], ...] = ()
        if params.include_tokens or pooling == POOL_NONE:
            tokens = tuple((tok, _unit(v) if normalize else v, oov)
                           for tok, v, oov in zip(enc.tokens, tv.tokens, enc.oov, strict=True))
        nearest: tuple[tuple[str, float], ...] = ()
        if params.nearest_k and matrix is not None and pooled is not None:
            nearest = _nearest(matrix, pooled, set(enc.ids), params.nearest_k, model)
        results.append(EmbedResult(text, pooled, tokens, nearest))
    analogies = []
    if params.analogies and matrix is not None:
        dim = int(matrix.shape[1])
        for i, (a, b, c) in enumerate(params.analogies):
            ids = []
            for field, word in (("a", a), ("b", b), ("c", c)):
                enc = model.encode(word)
                if len(enc.ids) != 1 or enc.oov[0]:
                    raise InvalidArgument("analogies", f"{word!r} is not a word of the vocabulary", at=f"[{i}].{field}")
                ids.append(enc.ids[0])
            query = matrix[ids[0]] - matrix[ids[1]] + matrix[ids[2]]
            analogies.append(((a, b, c), _nearest(matrix, query, set(ids), params.nearest_k or 5, model)))
    return EmbedResponse(dim, tuple(results), tuple(analogies))
