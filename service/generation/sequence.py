"""A sequence being generated and its sampling: what the engine and the task's step loop share.

`Sequence` holds one prompt's tokens, random stream and streamed text and takes one token per step
(`advance`, which yields `StepEvent`s); `choose` picks each running sequence's next token from a batch's
log-probabilities. Sampling follows Hugging Face's order: repetition penalty, temperature, top-k, top-p.
Each prompt has its own random stream seeded from (seed, prompt index), so the same seed gives the same text
whatever else shares the batch. Nothing here knows the model family: a sequence needs only a `Vocabulary`.
"""

from __future__ import annotations

import codecs
import itertools
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from plm.service.metrics import Metrics, observe_many

FINISH_LENGTH, FINISH_STOP, FINISH_EOS = "length", "stop", "eos"


class Vocabulary(Protocol):
    """What a sequence needs of its model: the end-of-text id and the text of its tokens."""

    @property
    def name(self) -> str: ...

    @property
    def eos_id(self) -> int: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self) -> list[bytes] | None: ...


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # EOS is not chosen before this many new tokens
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class StepEvent:
    """One prompt's progress: new text and tokens, and on its last event the finish reason and totals."""

    index: int
    text_delta: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def then(self, later: StepEvent) -> StepEvent:
        """This event and a later one of the same prompt as one: texts and ids joined, the later's end."""
        return StepEvent(self.index, self.text_delta + later.text_delta, self.token_ids + later.token_ids,
                         later.finish_reason, later.prompt_tokens, later.generated_tokens)


def penalised(logprobs: np.ndarray, allowed: np.ndarray, seqs: list[Sequence], owned: bool = False,
              banned: np.ndarray | None = None) -> np.ndarray:
    """(B, V) log-probabilities after the mask, each row's repetition penalty and its min_new_tokens rule.

    Pure unless `owned` (the caller hands the array over, as the engine does with a decode run's fresh output:
    it is changed in place rather than copied): otherwise the caller's array is copied before any change, and
    returned as it is when nothing applies. `banned`: the ids `allowed` leaves out (`np.flatnonzero(~allowed)`),
    when the caller keeps them from step to step.
    """
    x = logprobs
    if banned is None:
        banned = None if allowed.all() else np.flatnonzero(~allowed)
    if banned is not None and len(banned):  # the few disallowed columns set: cheaper than `np.where` over all
        if not owned:
            x = logprobs.copy()  # (B, V)
        x[:, banned] = -np.inf
    penalised_rows = [i for i, seq in enumerate(seqs) if seq.p.repetition_penalty != 1.0 and seq.seen]
    early = [i for i, seq in enumerate(seqs) if len(seq.generated) < seq.p.min_new_tokens]  # too early to end
    if (penalised_rows or early) and x is logprobs and not owned:
        x = logprobs.copy()  # the caller's array stays as it was
    if penalised_rows:  # every row's seen tokens in one gather and one scatter: (row, id) pairs
        counts = [len(seqs[i].seen) for i in penalised_rows]
        rows = np.repeat(penalised_rows, counts)
        ids = np.fromiter(itertools.chain.from_iterable(seqs[i].seen for i in penalised_rows), dtype=np.int64,
                          count=sum(counts))
        # In the scores' own precision, as a scalar penalty multiplies them.
        factor = np.repeat(np.array([seqs[i].p.repetition_penalty for i in penalised_rows], dtype=x.dtype), counts)
        # CTRL's penalty on log-probabilities (all ≤ 0): multiplying pushes seen tokens down.
        x[rows, ids] = x[rows, ids] * factor
    if early:
        x[early, [seqs[i].model.eos_id for i in early]] = -np.inf
    return x


# `_top_k` looks for a row's top k among the columns at or above a threshold when the vocabulary has at least this
# many columns per candidate; below that one selection over every column is as cheap.
_GROUP = 8
# ...and for at least this many rows: the threshold's fixed cost of a few more numpy calls is paid once per step,
# and one row's selection over every column is cheaper than that.
_MIN_ROWS = 4


def _top_k(xs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(G, k) the ids of each row's k largest scores of (G, V), best first (equal scores in id order above the
    threshold below, else in the selection's order; a tie at the k-th place keeps any of the tied), and (G, k)
    those scores.

    One selection over the whole (G, V) costs more than its few vectorised passes: the V columns fall into
    V // _GROUP strided groups; each row's k-th largest group maximum is a threshold at or below its k-th largest
    score (k groups each hold a score at least that large), so the row's top k are among the few columns at or
    above it, and one stable sort runs over those alone (rows right-padded with -inf to the longest).
    """
    g, v = xs.shape
    groups = v // _GROUP
    if groups >= 2 * k and g >= _MIN_ROWS:
        best = np.maximum.reduce(xs[:, :groups * _GROUP].reshape(g, _GROUP, groups), axis=1)  # (G, groups)
        threshold = np.partition(best, groups - k, axis=1)[:, groups - k]  # (G,)
        flat = np.flatnonzero(xs >= threshold[:, None])  # row-major: each row's columns in id order
        rows = flat // v
        each = np.arange(g)
        if len(flat) == g * k and (rows[::k] == each).all() and (rows[k - 1::k] == each).all():
            # Exactly k columns per row (no ties at the threshold: the usual case), each row's a block of `flat`
            # whose first and last entries are that row's: the columns in id order as they are, (G, k).
            ids, vals = (flat - rows * v).reshape(g, k), xs.reshape(-1)[flat].reshape(g, k)
            order = np.argsort(-vals, axis=1, kind="stable")
            return ids[each[:, None], order], vals[each[:, None], order]
        counts = np.bincount(rows, minlength=g)  # (G,) each ≥ k, unless a score is NaN
        if counts.min() >= k:
            width = int(counts.max())
            at = rows * width + np.arange(len(flat)) - (np.cumsum(counts) - counts)[rows]  # flat place in (G, W)
            vals = np.full(g * width, -np.inf, dtype=xs.dtype)
            ids = np.zeros(g * width, dtype=np.int64)
            vals[at] = xs.reshape(-1)[flat]
            ids[at] = flat - rows * v
            # Stable: equal scores keep id order, and a row's padding (after its real columns) comes last.
            order = np.argsort(-vals.reshape(g, width), axis=1, kind="stable")[:, :k]
            at = np.arange(g)[:, None]
            return ids.reshape(g, width)[at, order], vals.reshape(g, width)[at, order]
    cand = np.argpartition(xs, v - k, axis=1)[:, -k:]  # the top k, in no order
    at = np.arange(g)[:, None]
    vals = xs[at, cand]
    order = np.argsort(-vals, axis=1, kind="stable")
    return cand[at, order], vals[at, order]


TOP_K, SORTED, EVERY = "top_k", "sorted", "every"  # what a sampled row draws from: see `candidates`


def candidates(top_k: int, top_p: float, vocab: int) -> str:
    """What a sampled row (temperature > 0) draws from: its top k tokens best first (TOP_K), every token best first
    (SORTED: top-p without top-k needs the order) or every token in vocabulary order (EVERY)."""
    if 0 < top_k < vocab:
        return TOP_K
    return SORTED if top_p < 1.0 else EVERY


def nucleus(xs: np.ndarray, temperature: float | np.ndarray, top_k: int | np.ndarray, top_p: float | np.ndarray
            ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """What sampling draws from, for (G, V) scores (temperature > 0): (cand, cum, n). Each setting is one value for
    every row or a (G,) array of each row's own, the rows agreeing on their `candidates`.

    `cand` (G, C) holds the candidate token ids best first, or is None when every token is a candidate in
    vocabulary order (C = V); `cum` (G, C) the running sum of exp(score / temperature - max) over them; `n` (G,)
    how many leading candidates survive top-k and top-p. A row's distribution is therefore the first n[i] steps
    of cum[i] divided by cum[i, n[i] - 1]. Rows with different top-k share one selection of the largest k
    (a row's own k best are the first k of it, in the same order; equal scores aside, see `_top_k`); a running
    sum's first steps do not depend on the columns after them, so each row's figures are those it has alone.
    Pure; `choose` draws from it by inverse CDF.
    """
    g, v = xs.shape
    # () or (G,) each; the scalar case (every row one setting, the usual batch) skips the per-row indexing
    t = np.asarray(temperature, dtype=np.float64)
    k = np.asarray(top_k, dtype=np.int64)
    p = np.asarray(top_p, dtype=np.float64)
    kind = candidates(int(k.flat[0]), float(p.flat[0]), v) if g else EVERY
    if kind == TOP_K:
        cand, vals = _top_k(xs, int(k.max()))  # best first
    elif kind == SORTED:
        cand = np.argsort(-xs, axis=1, kind="stable")
        vals = np.take_along_axis(xs, cand, axis=1)
    else:
        cand, vals = None, xs  # every token, in vocabulary order
    scaled = vals.astype(np.float64) / (t[:, None] if t.ndim else t)
    cum = np.cumsum(np.exp(scaled - scaled.max(axis=1, keepdims=True)), axis=1)
    if not (k.ndim and kind == TOP_K) and not p.ndim:  # one width and one top-p for every row
        n = np.full(g, cum.shape[1])
        if p < 1.0:  # the smallest best-first set whose probability reaches top_p
            n = np.minimum((cum < p * cum[:, -1:]).sum(axis=1) + 1, cum.shape[1])
        return cand, cum, n
    n = k if kind == TOP_K and k.ndim else np.full(g, cum.shape[1])  # (G,) each row's candidates
    cut = p < 1.0
    if cut.any():  # the same within each row's own candidates and top_p
        total = cum[np.arange(g), n - 1]
        reach = np.minimum((cum < (p[:, None] if p.ndim else p) * total[:, None]).sum(axis=1) + 1, n)
        n = np.where(cut, reach, n) if p.ndim else reach
    return cand, cum, n


def choose(logprobs: np.ndarray, allowed: np.ndarray, seqs: list[Sequence], owned: bool = False,
           banned: np.ndarray | None = None) -> list[int]:
    """The next token of each sequence from its row of (B, V) log-probabilities (`owned`: the array is the
    caller's to give up, and may be changed in place; `banned`: `allowed`'s left-out ids; see `penalised`).

    This runs on the engine's critical path, so it is vectorised over the rows: one pass for all the greedy
    ones and one for each kind of `candidates` (usually all of them one), whatever their temperatures, top-k
    and top-p (the top-k candidates only when top_k is set, a sort only when top_p needs an order), and one
    uniform draw per row from that sequence's own generator against the cumulative distribution (inverse CDF).
    Each row's result depends only on its own row and generator, so a sequence gets the same token whatever
    it is batched with (equal scores at the top-k boundary aside: `_top_k` keeps any of them).
    """
    x = penalised(logprobs, allowed, seqs, owned, banned)
    out = [0] * len(seqs)
    vocab = x.shape[1]
    settings: dict[tuple[float, int, float], list[int]] = {}  # rows by their setting: usually one
    for i, seq in enumerate(seqs):
        settings.setdefault((seq.p.temperature, seq.p.top_k, seq.p.top_p), []).append(i)
    kinds: dict[str, list[tuple[float, int, float]]] = {}  # the settings of each pass
    for setting in settings:
        temperature, top_k, top_p = setting
        kinds.setdefault("greedy" if temperature == 0.0 else candidates(top_k, top_p, vocab), []).append(setting)
    for kind, passing in kinds.items():
        # ascending, so that all of them are `x` as it is
        rows = settings[passing[0]] if len(passing) == 1 else sorted(i for s in passing for i in settings[s])
        xs = x if len(rows) == len(seqs) else x[rows]  # (G, V)
        if kind == "greedy":
            for i, t in zip(rows, np.argmax(xs, axis=1).tolist(), strict=True):
                out[i] = t
            continue
        if len(passing) == 1:  # one setting: scalars
            cand, cum, n = nucleus(xs, *passing[0])
        else:  # each row its own
            per_row = np.array([(seqs[i].p.temperature, seqs[i].p.top_k, seqs[i].p.top_p) for i in rows])  # (G, 3)
            cand, cum, n = nucleus(xs, per_row[:, 0], per_row[:, 1].astype(np.int64), per_row[:, 2])
        at = np.arange(len(rows))
        total = cum[at, n - 1]
        u = np.array([seqs[i].rng.random() for i in rows]) * total
        pick = np.minimum((cum <= u[:, None]).sum(axis=1), n - 1)
        tokens = pick if cand is None else cand[at, pick]
        for i, t in zip(rows, tokens.tolist(), strict=True):
            out[i] = t
    return out


def _stable_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` safe to stream: no half UTF-8 character, no possible start of a stop sequence."""
    cut = len(text)
    while cut > 0 and text[cut - 1] == "\ufffd":  # a multi-byte character still arriving
        cut -= 1
    for s in stops:
        for k in range(min(len(s) - 1, cut), 0, -1):
            if text.endswith(s[:k], 0, cut):
                cut -= k
                break
    return text[:cut]


class Sequence:
    """One prompt's generation: its tokens, random stream and text streamed so far.

    Shared by the task's step loop (tasks/generate.py) and the KV-cache engine (generation/engine.py), so both
    choose, stop and stream identically. With a byte-level tokenizer (`Vocabulary.token_bytes`) the text grows
    by one token's bytes per step through an incremental UTF-8 decoder (which holds back a character still
    arriving), so a step costs the same at token 100 as at token 1; otherwise the whole text is decoded again
    each step.
    """

    def __init__(self, index: int, prompt_ids: list[int], p: SamplingParams, seed: int, model: Vocabulary,
                 metrics: Metrics, started: float, prompt_seen: bool = True) -> None:
        """`prompt_seen`: the repetition penalty counts the prompt's tokens too (a decoder-only model's; an
        encoder-decoder's prompt is its source, and only the decoder's own tokens are penalised)."""
        self.index = index
        self.prompt_ids = prompt_ids
        self.p = p
        self.rng = np.random.default_rng([seed, index])
        self.model = model
        self.started = started
        self.generated: list[int] = []
        self.text = ""  # the text of `generated`, cut at a stop sequence once one appears
        self.sent = ""  # the text streamed so far
        self.last_token_at: float | None = None
        self.finished = False
        self.seen = set(prompt_ids) if prompt_seen else set()  # for the repetition penalty
        self._bytes = model.token_bytes()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = False  # whether `_utf8` holds the first bytes of a character
        self._longest_stop = max((len(s) for s in p.stop), default=0)
        # The labelled metric children, looked up once: `labels()` takes a lock and a dict lookup per call.
        self._m_tokens = metrics.generated_tokens.labels(model.name)
        self._m_first = metrics.time_to_first_token.labels(model.name)
        self._m_gap = metrics.inter_token_latency.labels(model.name)

    def observe(self, now: float) -> None:
        """The metrics of a token taken at `now` (time.monotonic())."""
        self._m_tokens.inc()
        if self.last_token_at is None:
            self._m_first.observe(now - self.started)
        else:
            self._m_gap.observe(now - self.last_token_at)
        self.last_token_at = now

    def advance(self, tok: int, now: float | None = None, observed: bool = False) -> list[StepEvent]:
        """Take the chosen next token; the events it produces (the last one carries the finish reason). `now`:
        time.monotonic() of the step, when the caller advances a batch of sequences at once; `observed`: the
        token's metrics are recorded already (`observe`, `observe_step`)."""
        p = self.p
        if not observed:
            self.observe(time.monotonic() if now is None else now)
        finish = None
        eos = tok == self.model.eos_id
        if eos:
            finish = FINISH_EOS
        else:
            self.generated.append(tok)
            self.seen.add(tok)
        if finish is None and len(self.generated) >= p.max_new_tokens:
            finish = FINISH_LENGTH
        before = len(self.text)
        if self._bytes is None:
            self.text, before = self.model.decode(self.generated), 0
        elif not eos:
            piece = self._bytes[tok]
            if self._pending:
                self.text += self._utf8.decode(piece)
                self._pending = bool(self._utf8.getstate()[0])
            else:  # no character is half-way: a token that is whole UTF-8 (most are) decodes on its own
                try:
                    self.text += piece.decode()
                except UnicodeDecodeError:
                    self.text += self._utf8.decode(piece)
                    self._pending = bool(self._utf8.getstate()[0])
        if finish is not None and self._bytes is not None:
            self.text += self._utf8.decode(b"", final=True)  # an unfinished character shows as U+FFFD
        # A stop sequence can only begin where the text before this step could not already hold it all.
        start = max(0, before - self._longest_stop + 1)
        for s in p.stop:
            at = self.text.find(s, start)
            if s and at >= 0:
                self.text, finish = self.text[:at], FINISH_STOP
                break
        stable = self.text if finish else _stable_prefix(self.text, p.stop)
        delta = stable[len(self.sent):] if stable.startswith(self.sent) else ""
        self.sent += delta
        events = []
        new_ids = () if eos else (tok,)
        if delta or new_ids:
            events.append(StepEvent(self.index, delta, new_ids))
        if finish is not None:
            self.finished = True
            events.append(StepEvent(self.index, "", (), finish, len(self.prompt_ids), len(self.generated)))
        return events


def observe_step(seqs: list[Sequence], now: float) -> None:
    """The metrics of one step's tokens, one for each of `seqs` (then advanced with `observed=True`): the
    generated-tokens counter once and the inter-token gaps in one histogram update. The sequences are one
    engine's, so of one model: they share its series."""
    if not seqs:
        return
    first = seqs[0]
    first._m_tokens.inc(len(seqs))
    gaps = []
    for s in seqs:
        if s.last_token_at is None:
            s._m_first.observe(now - s.started)
        else:
            gaps.append(now - s.last_token_at)
        s.last_token_at = now
    observe_many(first._m_gap, gaps)
