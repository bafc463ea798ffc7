"""BERT adapter: a WordPiece tokenizer and one ONNX graph, run through the model's dynamic batcher.

Graph contract (export/bert_export.py): inputs `input_ids`, `attention_mask`, `token_type_ids` int64 (B, T)
and `mask_positions` int64 (B, M); outputs `mask_logprobs` (B, M, V) at those positions, `nsp_logprobs`
(B, 2) (index 0 = IsNext) and `hidden_states` (B, T, C). Rows are `[CLS] text [SEP]` (or `[CLS] A [SEP] B
[SEP]`), right-padded, so a row's numbers do not depend on what it is batched with.

BERT reads the whole text at once, so there is no left-to-right probability: `score` is the
pseudo-log-likelihood (Salazar et al. 2020), one row per token with that token alone masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.errors import FailedPrecondition, InvalidArgument
from plm.service.families.base import ManifestSource, ModelAdapter, TokenScores, TokenVectors, top_of_rows
from plm.service.families.capabilities import Embedder, MaskFiller, NextSentencePredictor, Scorer
from plm.service.families.wordpiece import WordPieceText
from plm.service.metrics import Metrics
from plm.service.runtime import open_graph, pad_right


class _Row(NamedTuple):  # NamedTuples: one of each per row of every call, and a frozen dataclass's init is slow
    ids: tuple[int, ...]  # with [CLS]/[SEP]
    types: tuple[int, ...]  # segment of each id
    positions: tuple[int, ...]  # columns whose MLM log-probs are wanted (may be empty)
    want_hidden: bool
    want_nsp: bool
    top: tuple[np.ndarray, int] | None = None  # (allowed, k): each blank's top k instead of its (V,) row


class _RowOut(NamedTuple):
    mask_logprobs: np.ndarray | None  # (M, V)
    hidden: np.ndarray | None  # (len(ids), C)
    nsp: np.ndarray | None  # (2,)
    mask_top: list[tuple[np.ndarray, np.ndarray]] | None = None  # per blank: (ids, log-probs), when `top` asked


class BertAdapter(WordPieceText, ModelAdapter, Scorer, MaskFiller, Embedder, NextSentencePredictor):
    """A masked LM: fills blanks, embeds, predicts the next sentence, and scores by pseudo-log-likelihood. It
    does not predict the next token (`next_logprobs` only refuses)."""

    family = "bert"
    score_method = "pseudo_log_likelihood"

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig, metrics: Metrics):
        super().__init__(name, folder, manifest)
        self._init_wordpiece(folder)
        self.session = open_graph(folder, self.spec, "model", config.runtime_for(name), name, metrics)
        self.served_by(self.session)
        self._batcher: DynamicBatcher[_Row, _RowOut] = DynamicBatcher(
            name, self._run, config.batching_for(name, self.spec.batching), metrics
        )

    # -- text (the rest is WordPieceText's) ----------------------------------------------------------------
    @property
    def mask_id(self) -> int:
        return self._mask

    # -- model --------------------------------------------------------------------------------------------
    def _single(self, seq: Sequence[int], positions: Sequence[int] = (), want_hidden: bool = False,
                top: tuple[np.ndarray, int] | None = None) -> _Row:
        """`[CLS] seq [SEP]`, segment 0; `positions` index `seq` and are shifted past [CLS]."""
        if len(seq) > self.context_budget:
            raise InvalidArgument("text", f"is {len(seq)} tokens; model {self.name!r} takes at most "
                                          f"{self.context_budget} (window {self.max_length}, less [CLS] and [SEP])")
        ids = (self._cls, *seq, self._sep)
        return _Row(ids, (0,) * len(ids), tuple(p + 1 for p in positions), want_hidden, False, top)

    async def _submit(self, rows: list[_Row], deadline: float | None) -> list[_RowOut]:
        return await self._batcher.submit(rows, [len(r.ids) for r in rows], deadline)

    async def mask_logprobs(self, seqs: list[list[int]], positions: list[list[int]],
                            deadline: float | None) -> list[np.ndarray]:
        outs = await self._submit(self._blank_rows(seqs, positions), deadline)
        empty = np.zeros((0, self.vocab_size), dtype=np.float32)
        return [o.mask_logprobs if o.mask_logprobs is not None else empty for o in outs]

    async def mask_top(self, seqs: list[list[int]], positions: list[list[int]], allowed: np.ndarray, k: int,
                       deadline: float | None) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """The top k of each blank, taken on the batcher's thread: (M, V) rows never reach the event loop."""
        rows = self._blank_rows(seqs, positions, top=(allowed, k))
        return [o.mask_top or [] for o in await self._submit(rows, deadline)]

    def _blank_rows(self, seqs: list[list[int]], positions: list[list[int]],
                    top: tuple[np.ndarray, int] | None = None) -> list[_Row]:
        """One row per sequence, its blanks at `positions` (checked to index it)."""
        for seq, pos in zip(seqs, positions, strict=True):
            if any(not 0 <= p < len(seq) for p in pos):
                raise InvalidArgument("positions", f"must index the sequence of {len(seq)} tokens, got {pos}")
        return [self._single(s, p, top=top) for s, p in zip(seqs, positions, strict=True)]

    async def embed(self, seqs: list[list[int]], layer_weights: tuple[float, ...] | None,
                    deadline: float | None) -> list[TokenVectors]:
        # layer_weights is ELMo's; the graph exposes BERT's final layer only.
        outs = await self._submit([self._single(s, want_hidden=True) for s in seqs], deadline)
        return [TokenVectors(tokens=o.hidden[1:-1].copy(), cls=o.hidden[0].copy(), mean_all=o.hidden.mean(axis=0))
                for o in outs if o.hidden is not None]

    async def next_sentence_logprobs(self, pairs: list[tuple[list[int], list[int]]],
                                     deadline: float | None) -> np.ndarray:
        rows = []
        for a, b in pairs:
            if len(a) + len(b) + 3 > self.max_length:
                raise InvalidArgument("pair", f"is {len(a)} + {len(b)} tokens; model {self.name!r} takes at most "
                                              f"{self.max_length - 3} for both (window {self.max_length}, "
                                              "less [CLS] and two [SEP])")
            ids = (self._cls, *a, self._sep, *b, self._sep)
            types = (0,) * (len(a) + 2) + (1,) * (len(b) + 1)
            rows.append(_Row(ids, types, (), False, True))
        outs = await self._submit(rows, deadline)
        return np.array([o.nsp[0] for o in outs if o.nsp is not None], dtype=np.float32)  # log P(IsNext)

    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        """Pseudo-log-likelihood: log P(token_i | all other tokens) with token i alone masked, one row per
        (sequence, i), all in one submission. `add_eos` is ignored: BERT does not predict an end."""
        rows: list[_Row] = []
        for s in seqs:
            for i in range(len(s)):
                rows.append(self._single([*s[:i], self._mask, *s[i + 1:]], (i,)))
        outs = iter(await self._submit(rows, deadline))
        scores = []
        for s in seqs:
            lp = np.zeros(len(s), dtype=np.float64)
            for i, token in enumerate(s):
                row = next(outs).mask_logprobs  # (1, V): the blank at i
                assert row is not None
                lp[i] = row[0, token]
            scores.append(TokenScores(lp))
        return scores

    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        raise FailedPrecondition(f"model {self.name!r} (bert) is a masked LM: it does not predict the next token")

    def _run(self, rows: Sequence[_Row]) -> list[_RowOut]:
        """One padded ONNX run over a batch (on the batcher's thread)."""
        input_ids, mask = pad_right([r.ids for r in rows], self._pad)  # (B, T), right-padded
        types, _ = pad_right([r.types for r in rows], 0)  # (B, T)
        positions, _ = pad_right([r.positions for r in rows], 0)  # (B, M), blanks padded with column 0
        if positions.shape[1] == 0:  # no blanks wanted: one dummy column keeps the graph's shapes valid
            positions = np.zeros((len(rows), 1), dtype=np.int64)
        names = [n for n, want in (("mask_logprobs", any(r.positions for r in rows)),
                                   ("nsp_logprobs", any(r.want_nsp for r in rows)),
                                   ("hidden_states", any(r.want_hidden for r in rows))) if want]
        results = self.session.run(names, {
            "input_ids": input_ids, "attention_mask": mask, "token_type_ids": types, "mask_positions": positions,
        })
        mlp, nsp, hid = (results.get(n) for n in ("mask_logprobs", "nsp_logprobs", "hidden_states"))
        tops = _batch_tops(rows, mlp) if mlp is not None else {}
        return [
            _RowOut(
                mlp[i, : len(r.positions)].copy() if (mlp is not None and r.positions and r.top is None) else None,
                hid[i, : len(r.ids)].copy() if (hid is not None and r.want_hidden) else None,
                nsp[i].copy() if (nsp is not None and r.want_nsp) else None,
                tops.get(i, []) if (mlp is not None and r.top) else None,
            )
            for i, r in enumerate(rows)
        ]

    def info(self) -> dict[str, Any]:
        return {"providers": self.providers}


def _batch_tops(rows: Sequence[_Row], mlp: np.ndarray) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Each top-k blank's (ids, log-probs), by row index: the blanks of the whole batch that share an allowed
    mask and a k (every FillMask call of one model does) in one `top_of_rows` over their stacked (N, V) rows."""
    # (allowed, its bytes, k, row index per blank, blank per blank)
    groups: list[tuple[np.ndarray, bytes, int, list[int], list[int]]] = []
    for i, r in enumerate(rows):
        if r.top is None or not r.positions:
            continue
        allowed, k = r.top
        key = None  # (V,) bool as bytes: a bytes compare is a memcmp, far cheaper than np.array_equal
        for g in groups:
            if g[2] != k:
                continue
            if g[0] is allowed:  # the same array (FillMask passes one per model)
                break
            key = allowed.tobytes() if key is None else key
            if g[1] == key:
                break
        else:
            g = (allowed, allowed.tobytes() if key is None else key, k, [], [])
            groups.append(g)
        g[3].extend([i] * len(r.positions))
        g[4].extend(range(len(r.positions)))
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for allowed, _, k, at, blank in groups:
        for i, top in zip(at, top_of_rows(mlp[at, blank], allowed, k), strict=True):  # the group's (N, V) rows
            out.setdefault(i, []).append(top)
    return out
