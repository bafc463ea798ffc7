"""GPT adapter: a byte-level BPE tokenizer and one ONNX graph, run through the model's dynamic batcher.

Graph contract (export/onnx_export.py): inputs `input_ids`, `attention_mask`, `position_ids` int64 (B, T);
outputs `token_logprobs` (B, T) = log P(x_t | x_<t) (position 0 unused), `next_logprobs` (B, V) = the
distribution after each row's last real token, `hidden_states` (B, T, C). Rows are right-padded and
`position_ids` come from the mask, so a row's numbers do not depend on what it is batched with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.families.base import ManifestSource, ModelAdapter, TokenScores, TokenVectors
from plm.service.families.bytebpe import ByteLevelText
from plm.service.families.capabilities import (
    Embedder,
    Generator,
    NextWordPredictor,
    PrefixScorer,
    Scorer,
    generate_by_recompute,
)
from plm.service.generation.engine import GenerationEngine
from plm.service.generation.sequence import Sequence as GenSequence
from plm.service.generation.sequence import StepEvent
from plm.service.metrics import Metrics
from plm.service.runtime import cores, open_graph, pad_right
from tokenizers import Tokenizer


@dataclass(frozen=True)
class _Row:
    ids: tuple[int, ...]  # BOS + tokens (+ EOS)
    want_tokens: bool = False  # fetch token_logprobs
    want_next: bool = False  # fetch next_logprobs
    want_hidden: bool = False  # fetch hidden_states


@dataclass(frozen=True)
class _RowOut:
    token_logprobs: np.ndarray | None  # (n,)
    next_logprobs: np.ndarray | None  # (V,)
    hidden_states: np.ndarray | None = None  # (n, C)


class GptAdapter(ByteLevelText, ModelAdapter, Scorer, NextWordPredictor, Generator, Embedder, PrefixScorer):
    """A causal LM: it scores, predicts the next token, generates (with a KV-cache engine when the folder has a
    decoder graph and the runtime enables it, else by recomputing), embeds, and scores classify's labels from a
    cached prefix when its engine runs."""

    family = "gpt"
    # The KV-cache generation engine (plm.service.generation), when the model has a decoder graph and it is enabled.
    engine: GenerationEngine | None = None

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig, metrics: Metrics):
        super().__init__(name, folder, manifest)
        tok = self.spec.tokenizer
        self.tokenizer = Tokenizer.from_file(str(folder / tok.file))
        self.set_up_text()
        self._eos = self.special_id(self.tokenizer, tok.special("eos", "<|endoftext|>"))
        self._bos = self.special_id(self.tokenizer, tok.special("bos", "<|endoftext|>"))
        runtime = config.runtime_for(name)
        self.session = open_graph(folder, self.spec, "model", runtime, name, metrics)
        self.served_by(self.session)
        self._metrics = metrics
        self._batcher: DynamicBatcher[_Row, _RowOut] = DynamicBatcher(
            name, self._run, config.batching_for(name, self.spec.batching), metrics
        )
        if self._bos != self._eos:  # GPT-2 style: one <|endoftext|> is both, and ending the text is allowed
            self._never[self._bos] = True
        decoder = self.spec.graphs.get("decoder")
        if decoder is not None and runtime.kv_cache:
            # Unless threads are configured, the decoder leaves one core free: the engine's thread runs it while the
            # event loop sends the previous step's tokens (2 cores: 1 thread, which also ran a B=16 step faster
            # than 2 there: docs/benchmarks.md, "Runtime settings behind the defaults").
            threads = runtime.intra_op_threads or max(1, cores() - 1)
            decoder_runtime = dataclasses.replace(runtime, spin_wait=runtime.decoder_spin_wait,
                                                  intra_op_threads=threads)
            decoder_session = open_graph(folder, self.spec, "decoder", decoder_runtime, name, metrics)
            layout = None  # lays the KV cache out again on the decoder's device (models exported before it: none)
            if decoder_session.io_binding and "kv_layout" in self.spec.graphs:
                layout = open_graph(folder, self.spec, "kv_layout", dataclasses.replace(decoder_runtime, variant=""),
                                    name, metrics)
            self.engine = GenerationEngine(
                name, decoder_session, *decoder.cache_dims(),
                self._bos, self._eos, ~self._never, config.batching_for(name, self.spec.batching), metrics,
                layout, runtime.prefix_reuse)

    # -- text ----------------------------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return self._eos


    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        if self.engine is not None:
            self.engine.start()

    async def close(self) -> None:
        await super().close()
        if self.engine is not None:
            await self.engine.close()

    def refuse_if_full(self, rows: int, generate: bool = False) -> None:
        """Generation queues in the engine when there is one; everything else in the batcher."""
        if generate and self.engine is not None:
            self.engine.refuse_if_full(rows)
        else:
            super().refuse_if_full(rows, generate)

    # -- generation ---------------------------------------------------------------------------------------
    def generate(self, seqs: list[GenSequence], deadline: float | None) -> AsyncIterator[StepEvent]:
        """Continuous batching in the KV-cache engine; without one, each step re-reads every sequence through
        the batcher."""
        if self.engine is not None:
            return self.engine.generate(seqs, deadline)
        return generate_by_recompute(self, self, seqs, deadline)

    @property
    def reuses_prefix(self) -> bool:
        return self.engine is not None and self.engine.prefix_reuse

    async def score_continuations(self, prefix: list[int], rows: list[tuple[list[int], list[int]]],
                                  deadline: float | None) -> list[np.ndarray]:
        assert self.engine is not None, "score_continuations needs the KV-cache engine (see reuses_prefix)"
        return await self.engine.score_continuations(prefix, rows, deadline)

    # -- log-probabilities --------------------------------------------------------------------------------
    async def score(self, seqs: list[list[int]], add_eos: bool, deadline: float | None) -> list[TokenScores]:
        rows = [_Row((self._bos, *s, *((self._eos,) if add_eos else ())), want_tokens=True) for s in seqs]
        outs = await self._batcher.submit(rows, [len(r.ids) for r in rows], deadline)
        # Position t of token_logprobs scores ids[t]; position 0 is the BOS, which is given, not scored.
        return [TokenScores(o.token_logprobs[1:]) for o in outs if o.token_logprobs is not None]  # float64 views

    async def next_logprobs(self, contexts: list[list[int]], deadline: float | None) -> np.ndarray:
        rows = [_Row((self._bos, *c), want_next=True) for c in contexts]
        outs = await self._batcher.submit(rows, [len(r.ids) for r in rows], deadline)
        return np.stack([o.next_logprobs for o in outs if o.next_logprobs is not None])

    async def embed(self, seqs: list[list[int]], layer_weights: tuple[float, ...] | None,
                    deadline: float | None) -> list[TokenVectors]:
        """The final layer's hidden state of each text token (after the BOS, which is left out)."""
        rows = [_Row((self._bos, *s), want_hidden=True) for s in seqs]
        outs = await self._batcher.submit(rows, [len(r.ids) for r in rows], deadline)
        return [TokenVectors(o.hidden_states[1:]) for o in outs if o.hidden_states is not None]

    def _run(self, rows: Sequence[_Row]) -> list[_RowOut]:
        """One padded ONNX run over a batch (on the batcher's thread)."""
        input_ids, mask = pad_right([r.ids for r in rows], self._eos)  # (B, T), right-padded
        position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        names = [n for n, want in (("token_logprobs", any(r.want_tokens for r in rows)),
                                   ("next_logprobs", any(r.want_next for r in rows)),
                                   ("hidden_states", any(r.want_hidden for r in rows))) if want]
        results = self.session.run(names, {
            "input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
        })
        tok, nxt = results.get("token_logprobs"), results.get("next_logprobs")  # (B, T), (B, V)
        hid = results.get("hidden_states")  # (B, T, C)
        if tok is not None:  # float64 for the whole batch at once, here on the model's thread, not per row on the loop
            tok = tok.astype(np.float64)
        return [
            _RowOut(
                tok[i, : len(r.ids)] if (tok is not None and r.want_tokens) else None,  # views of the new array
                nxt[i].copy() if (nxt is not None and r.want_next) else None,
                hid[i, : len(r.ids)].copy() if (hid is not None and r.want_hidden) else None,
            )
            for i, r in enumerate(rows)
        ]

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"providers": self.providers,
                                "generation": "kv_cache" if self.engine is not None else "recompute"}
        if self.engine is not None:  # where the decoder's keys and values stay between steps ("off": numpy)
            session = self.engine.session
            info["io_binding"] = session.device if session.io_binding else "off"
            if session.io_binding:  # where joins and leaves lay the batch out again
                info["kv_layout"] = session.device if self.engine.layout is not None else "host"
            info["classify"] = "prefix_cache" if self.engine.prefix_reuse else "whole_sequences"
        return info
