"""GPT's whole-word PredictNext against an outside oracle: the word probabilities recomputed from raw logits.

The proto documents P(word | ctx) = P(t1 | ctx) · … · P(tn | ctx, t1..tn-1) · P(boundary | ctx, t1..tn), where
the boundary is any token that starts a new word, or the end of the text, and spellings of one word that the
beam finds are summed. Here every returned word is recomputed from the model's raw next-token log-probabilities:
`model.onnx` run directly with onnxruntime, one unpadded sequence at a time (no batching, no KV cache, no
family code), the context's ids from the model's tokenizer.json. Word starts come from its vocabulary.

- beam_width=1 follows one path: each answer is the greedy continuation of its first token, and equals the
  recomputed product within 1e-6.
- max_word_tokens=1: the beam is the beam_width likeliest word-initial tokens, and each word's probability is
  the sum, over those of its spellings, of P(t) · P(boundary | t), within 1e-6 (beam 2 and 16 differ).
- the default search: each answer lies between its own spelling's recomputed probability and the sum over
  every spelling of the word in at most max_word_tokens tokens, and no answer has more tokens than allowed.
"""

from __future__ import annotations

import json
import math
import unicodedata
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plm.api.v1 import plm_pb2 as pb

TOLERANCE = 1e-6
# Mid-sentence contexts, and ones whose likely next word is punctuation that the end of the text often follows
# (so P(boundary) there is mostly P(EOS)).
CONTEXTS = ["The king is", "Good morrow, my", "And then the", "Long live the king", "It is done", "I am"]


def starts_word(token: str) -> bool:
    """Byte-level BPE: a token starting with a space, newline or tab (Ġ, Ċ, ĉ), or with punctuation."""
    return token[:1] in ("Ġ", "Ċ", "ĉ") or (token != "" and unicodedata.category(token[0])[0] not in "LNM")


class Oracle:
    """The served GPT's raw next-token distribution, computed apart from the server."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        self.session = ort.InferenceSession(str(folder / manifest["graphs"]["model"]["file"]),
                                            providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / manifest["tokenizer"]["file"]))
        self.eos = self.tokenizer.token_to_id(manifest["tokenizer"]["eos"])
        vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        self.pieces = [piece for piece, _ in vocab]
        starts = np.array([starts_word(p) for p in self.pieces])
        self.boundary = starts.copy()
        self.boundary[self.eos] = True  # ending the text ends the word
        self.initial = starts.copy()
        self.initial[self.eos] = False
        self.continuation = ~starts
        self.continuation[self.eos] = False
        self._next = cache(self._next_uncached)

    def _next_uncached(self, ids: tuple[int, ...]) -> np.ndarray:
        x = np.array([(self.eos, *ids)], dtype=np.int64)  # BOS (= EOS) first, as the family does
        out = self.session.run(["next_logprobs"], {"input_ids": x, "attention_mask": np.ones_like(x),
                                                   "position_ids": np.arange(x.shape[1])[None, :]})[0]
        return out[0].astype(np.float64)  # (V,) log-probabilities after the last id

    def next(self, ids: tuple[int, ...]) -> np.ndarray:
        return self._next(ids)

    def path(self, ctx: tuple[int, ...], path: tuple[int, ...]) -> float:
        """log P(t1..tn | ctx) + log P(boundary | ctx, t1..tn)."""
        lp = sum(self.next(ctx + path[:i])[t] for i, t in enumerate(path))
        return float(lp + np.logaddexp.reduce(self.next(ctx + path)[self.boundary]))

    def word(self, ids: tuple[int, ...]) -> str:
        return self.tokenizer.decode(list(ids)).strip()

    def spellings(self, word: str, longest: int) -> list[tuple[int, ...]]:
        """Every path of at most `longest` tokens (word-initial, then continuations) that decodes to `word`."""
        continuations = [int(t) for t in np.flatnonzero(self.continuation)]
        out: list[tuple[int, ...]] = []
        stack: list[tuple[int, ...]] = [(int(t),) for t in np.flatnonzero(self.initial)]
        while stack:
            path = stack.pop()
            text = self.word(path)
            if not word.startswith(text):
                continue
            if text == word:
                out.append(path)
            if len(path) < longest:
                stack.extend((*path, t) for t in continuations)
        return out


@pytest.fixture(scope="module")
def oracle(tiny_repo: Path) -> Oracle:
    return Oracle(tiny_repo / "gpt")


def predict(client: Any, top_k: int, beam_width: int = 0, max_word_tokens: int = 4) -> list[Any]:
    request = pb.PredictNextRequest(model="gpt", contexts=CONTEXTS, top_k=top_k, max_word_tokens=max_word_tokens,
                                    beam_width=beam_width or None)
    return list(client.stub.PredictNext(request).predictions)


@pytest.fixture(scope="module")
def contexts(oracle: Oracle) -> list[tuple[int, ...]]:
    """Each context's ids by the model's own tokenizer.json (a wrong id shows as a probability mismatch)."""
    return [tuple(oracle.tokenizer.encode(text).ids) for text in CONTEXTS]


def test_beam_width_one_follows_one_greedy_path(client: Any, oracle: Oracle, contexts: list[tuple[int, ...]]) -> None:
    longest = 3
    for ctx, pred in zip(contexts, predict(client, top_k=10, beam_width=1, max_word_tokens=longest), strict=True):
        assert 1 <= len(pred.words) <= longest  # one path: at most one word per length
        for w in pred.words:
            path = tuple(w.token_ids)
            assert oracle.initial[path[0]] and all(oracle.continuation[t] for t in path[1:])
            for i in range(1, len(path)):  # each next token is the best continuation
                row = np.where(oracle.continuation, oracle.next(ctx + path[:i]), -np.inf)
                assert path[i] == int(np.argmax(row)), f"{w.text!r}: token {i} is not the best continuation"
            assert w.text == oracle.word(path)
            assert abs(w.log_prob - oracle.path(ctx, path)) <= TOLERANCE, (w.text, w.log_prob, oracle.path(ctx, path))
            assert math.isclose(w.prob, math.exp(w.log_prob), rel_tol=1e-9)
        first = {w.token_ids[0] for w in pred.words}
        assert first == {int(np.argmax(np.where(oracle.initial, oracle.next(ctx), -np.inf)))}


@pytest.mark.parametrize("beam", [2, 16])
def test_one_token_words_sum_the_beams_spellings_exactly(client: Any, oracle: Oracle, contexts: list[tuple[int, ...]],
                                                          beam: int) -> None:
    """max_word_tokens=1: the beam holds the `beam` likeliest word-initial tokens, each a finished word; a word's
    probability sums its spellings among them. So the beam width decides which words can appear at all."""
    for ctx, pred in zip(contexts, predict(client, top_k=8, beam_width=beam, max_word_tokens=1), strict=True):
        row = oracle.next(ctx)
        first = sorted(np.flatnonzero(oracle.initial), key=lambda t: -row[t])[:beam]
        totals: dict[str, float] = {}
        for t in first:
            word = oracle.word((int(t),))
            if word:
                totals[word] = float(np.logaddexp(totals.get(word, -np.inf), oracle.path(ctx, (int(t),))))
        best = sorted(totals.values(), reverse=True)[:8]
        assert all(len(w.token_ids) == 1 and w.token_ids[0] in first for w in pred.words)
        np.testing.assert_allclose([w.log_prob for w in pred.words], best, rtol=0, atol=TOLERANCE)
        for w in pred.words:
            assert abs(w.log_prob - totals[w.text]) <= TOLERANCE, (w.text, w.log_prob, totals[w.text])


def test_default_search_lies_between_its_spelling_and_all_spellings(client: Any, oracle: Oracle,
                                                                    contexts: list[tuple[int, ...]]) -> None:
    longest = 3
    multi = 0
    for ctx, pred in zip(contexts, predict(client, top_k=5, max_word_tokens=longest), strict=True):
        assert len(pred.words) == 5
        for w in pred.words:
            assert 1 <= len(w.token_ids) <= longest and w.text == oracle.word(tuple(w.token_ids))
            own = oracle.path(ctx, tuple(w.token_ids))
            every = float(np.logaddexp.reduce([oracle.path(ctx, p) for p in oracle.spellings(w.text, longest)]))
            assert own - TOLERANCE <= w.log_prob <= every + TOLERANCE, (w.text, own, w.log_prob, every)
            multi += len(w.token_ids) > 1
        probs = [w.log_prob for w in pred.words]
        assert probs == sorted(probs, reverse=True)
    print(f"{multi} of {5 * len(CONTEXTS)} answers span more than one token")


def beam_search(oracle: Oracle, ctx: tuple[int, ...], top_k: int, beam: int, longest: int) -> dict[str, float]:
    """The documented search over raw logits: the `beam` likeliest word-initial tokens, each path closing a word
    (summed over the spellings found) and extended by its `beam` likeliest continuations, the `beam` likeliest
    paths kept per step; a path already below the k-th finished word cannot reach the top k and is dropped."""
    row = oracle.next(ctx)
    first = sorted(np.flatnonzero(oracle.initial), key=lambda t: -row[t])[:beam]
    paths: list[tuple[tuple[int, ...], float]] = [((int(t),), float(row[t])) for t in first]
    done: dict[str, float] = {}
    for _ in range(longest):
        grown = []
        for path, lp in paths:
            word = oracle.word(path)
            if word:
                done[word] = float(np.logaddexp(done.get(word, -np.inf), oracle.path(ctx, path)))
            nxt = oracle.next(ctx + path)
            grown += [((*path, int(t)), lp + float(nxt[t]))
                      for t in sorted(np.flatnonzero(oracle.continuation), key=lambda t: -nxt[t])[:beam]]
        best = sorted(done.values(), reverse=True)
        floor = best[top_k - 1] if len(best) >= top_k else -np.inf
        paths = sorted((p for p in grown if p[1] > floor), key=lambda p: -p[1])[:beam]
    return dict(sorted(done.items(), key=lambda kv: -kv[1])[:top_k])


@pytest.mark.parametrize(("beam", "longest"), [(4, 2), (16, 3)])
def test_the_search_sums_the_spellings_it_finds(client: Any, oracle: Oracle, contexts: list[tuple[int, ...]],
                                                beam: int, longest: int) -> None:
    """Against the documented search run on raw logits: the same words, each the sum of its spellings found."""
    summed = 0
    for ctx, pred in zip(contexts, predict(client, top_k=5, beam_width=beam, max_word_tokens=longest), strict=True):
        expected = beam_search(oracle, ctx, 5, beam, longest)
        got = {w.text: w.log_prob for w in pred.words}
        assert set(got) == set(expected), (got, expected)
        for word, lp in got.items():
            assert abs(lp - expected[word]) <= TOLERANCE, (word, lp, expected[word])
            summed += lp > oracle.path(ctx, tuple(next(w.token_ids for w in pred.words if w.text == word))) + 1e-3
    print(f"beam {beam}, {longest} tokens: {summed} answers sum more than one spelling")
