"""Encoder-decoder adapter (`encdec`): a byte-level BPE tokenizer with sentinels, an encoder graph and a
decoder-with-past graph, served through the KV-cache generation engine.

Graph contract (export/encdec_export.py; names in service/contract/graphs.py): the encoder runs once per
sequence on its right-padded source (</s> appended) and gives each decoder layer's cross-attention keys and
values; the decoder runs from `decoder_start_id` on its self-attention cache with those as inputs. Generate's
prompt is the encoder's input and the decoder's text the output; FillMask writes blank b as sentinel
`first_sentinel_id + b`, glued to the word before it as span corruption wrote them in training, and finds each
blank's spans by beam search (generation/seq2seq.py); Score with sources is log P(target | source).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from plm.service.batcher import DynamicBatcher
from plm.service.config import ServerConfig
from plm.service.errors import DeadlineExceeded, InvalidArgument
from plm.service.families.base import MASK, ManifestSource, ModelAdapter, TokenScores
from plm.service.families.bytebpe import ByteLevelText
from plm.service.families.capabilities import ConditionalScorer, Generator, SourceReader, SpanFiller
from plm.service.generation.engine import GenerationEngine
from plm.service.generation.runner import Encoder
from plm.service.generation.seq2seq import Infill, fill_spans, recompute_next, score_targets
from plm.service.generation.sequence import Sequence as GenSequence
from plm.service.generation.sequence import StepEvent, choose
from plm.service.metrics import Metrics
from plm.service.runtime import cores, open_graph
from tokenizers import Tokenizer

MAX_SPAN_TOKENS = 8  # longest span FillMask's beam search writes for one blank


class EncDecAdapter(ByteLevelText, ModelAdapter, Generator, ConditionalScorer, SpanFiller, SourceReader):
    """A Transformer encoder-decoder: text-to-text generation, conditional scores and span infilling."""

    family = "encdec"
    engine: GenerationEngine

    def __init__(self, name: str, folder: Path, manifest: ManifestSource, config: ServerConfig, metrics: Metrics):
        super().__init__(name, folder, manifest)
        spec = self.spec.encdec
        if spec is None:
            raise ValueError(f"{folder.name}: the manifest has no 'encdec' section")
        self.encdec = spec
        self.tokenizer = Tokenizer.from_file(str(folder / self.spec.tokenizer.file))
        self.set_up_text()
        self._never[[spec.pad_id, spec.decoder_start_id]] = True
        self._specials = np.zeros(self.vocab_size, dtype=bool)  # what a client may not write, nor a span hold
        self._specials[[spec.pad_id, spec.decoder_start_id, spec.eos_id]] = True
        self._specials[spec.first_sentinel_id:spec.first_sentinel_id + spec.sentinels] = True
        self.infill = Infill(spec.first_sentinel_id, spec.eos_id, ~self._specials, spec.max_target_length,
                             MAX_SPAN_TOKENS)
        runtime = config.runtime_for(name)
        threads = runtime.intra_op_threads or max(1, cores() - 1)  # as GPT's decoder: one core left to the loop
        decoder_runtime = dataclasses.replace(runtime, spin_wait=runtime.decoder_spin_wait, intra_op_threads=threads)
        decoder = open_graph(folder, self.spec, "decoder", decoder_runtime, name, metrics)
        encoder = open_graph(folder, self.spec, "encoder", decoder_runtime, name, metrics)
        self.served_by(decoder)
        if not runtime.kv_cache:  # generation re-reads each sequence whole every step, through the batcher
            self._batcher = DynamicBatcher(name, self._recompute, config.batching_for(name, self.spec.batching),
                                           metrics)
        # No KV layout graph: the batch (self-attention and cross-attention rows) is laid out in host memory.
        self.engine = GenerationEngine(
            name, decoder, *self.spec.graphs["decoder"].cache_dims(), spec.decoder_start_id, spec.pad_id,
            ~self._never, config.batching_for(name, self.spec.batching), metrics, None, False,
            Encoder(encoder, spec.eos_id))

    # -- text ----------------------------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return self.encdec.eos_id

    @property
    def context_budget(self) -> int:
        """Most target tokens the decoder reads (its window less the start token)."""
        return self.encdec.max_target_length - 1

    # -- the source side ----------------------------------------------------------------------------------
    @property
    def max_new_tokens(self) -> int:
        return self.encdec.max_target_length - 1

    def source_ids(self, text: str, field: str, at: str, truncate: bool = False) -> list[int]:
        if MASK in text:
            raise InvalidArgument(field, f"holds {MASK}: a blank is FillMask's to fill; model {self.name!r} "
                                         "generates from plain text", at=at)
        ids = self._checked_piece(text, field, at)
        if not ids:
            raise InvalidArgument(field, "has no tokens (empty or only whitespace)", at=at)
        return self._within_window(ids, field, at, truncate)

    def _checked_piece(self, text: str, field: str, at: str) -> list[int]:
        ids = self.encode_ids(text) if text.strip() else []
        written = [i for i in ids if self._specials[i]]
        if written:
            raise InvalidArgument(field, f"holds {self._token_texts[written[0]]!r} written literally; special tokens "
                                         f"and sentinels are the server's to write (mark a blank as {MASK})", at=at)
        return ids

    def _within_window(self, ids: list[int], field: str, at: str, truncate: bool) -> list[int]:
        limit = self.encdec.max_source_length - 1  # </s> ends every source
        if len(ids) <= limit:
            return ids
        if truncate:
            return ids[:limit]
        hint = f" (set truncate_prompt to keep its first {limit})" if field == "prompts" else ""
        raise InvalidArgument(field, f"is {len(ids)} tokens; model {self.name!r}'s encoder window is "
                                     f"{self.encdec.max_source_length} tokens with </s>, so a source holds at most "
                                     f"{limit}{hint}", at=at)

    def blanks(self, text: str, at: str) -> tuple[list[int], int]:
        """A FillMask text's source ids (blank b as sentinel b, glued to the word before it) and its blank count."""
        pieces = text.split(MASK)
        blanks = len(pieces) - 1
        if blanks == 0:
            raise InvalidArgument("texts", f"has no {MASK} blank to fill", at=at)
        if blanks > self.encdec.sentinels:
            raise InvalidArgument("texts", f"has {blanks} {MASK} blanks; model {self.name!r} has "
                                           f"{self.encdec.sentinels} sentinels, so at most {self.encdec.sentinels}",
                                  at=at)
        for piece in pieces:
            self._checked_piece(piece, "texts", at)
        # One string with the sentinels written in (the pieces tokenized alone would split differently at their
        # edges than the sentences span corruption cut its spans from).
        glued = "".join(piece.rstrip() + self._token_texts[self.encdec.first_sentinel_id + b]
                        for b, piece in enumerate(pieces[:-1])) + pieces[-1]
        ids = self.encode_ids(glued)
        return self._within_window(ids, "texts", at, False), blanks

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        await super().start()
        self.engine.start()

    async def close(self) -> None:
        await super().close()
        await self.engine.close()

    def refuse_if_full(self, rows: int, generate: bool = False) -> None:
        if generate and self._batcher is None:
            self.engine.refuse_if_full(rows)
        elif generate:
            super().refuse_if_full(rows, generate)

    # -- capabilities -------------------------------------------------------------------------------------
    def generate(self, seqs: list[GenSequence], deadline: float | None) -> AsyncIterator[StepEvent]:
        """Continuous batching in the KV-cache engine: each sequence's prompt is its source. With `kv_cache` off,
        every step re-reads each running sequence whole (source and tokens so far) through the batcher."""
        if self._batcher is None:
            return self.engine.generate(seqs, deadline)
        return self._generate_by_recompute(seqs, deadline)

    async def _generate_by_recompute(self, seqs: list[GenSequence], deadline: float | None
                                     ) -> AsyncIterator[StepEvent]:
        allowed = ~self._never
        active = seqs
        while active:
            rows = [(tuple(s.prompt_ids), tuple(s.generated)) for s in active]
            out = await self.batcher.submit(rows, [len(src) + len(done) for src, done in rows], deadline)
            for seq, tok in zip(active, choose(np.stack(out), allowed, active), strict=True):
                for ev in seq.advance(tok):
                    yield ev
            active = [s for s in active if not s.finished]

    def _recompute(self, rows: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[np.ndarray]:
        """One batched step without a cache (on the batcher's thread)."""
        return recompute_next(self.engine.runner, rows)

    def _in_time(self, deadline: float | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(f"model {self.name!r}: the deadline passed before the decoder ran")

    async def score_given(self, pairs: list[tuple[list[int], list[int]]], add_eos: bool,
                          deadline: float | None) -> list[TokenScores]:
        self._in_time(deadline)
        rows = [(src, [*tgt, *((self.eos_id,) if add_eos else ())]) for src, tgt in pairs]
        scored: list[np.ndarray] = await self.engine.call(score_targets, self.engine.runner, rows)
        return [TokenScores(s) for s in scored]

    async def fill_spans(self, texts: list[str], k: int, deadline: float | None
                         ) -> list[list[list[tuple[tuple[int, ...], float]]]]:
        rows = [self.blanks(t, f"[{i}]") for i, t in enumerate(texts)]
        self._in_time(deadline)
        return [await self.engine.call(fill_spans, self.engine.runner, ids, n, k, self.infill) for ids, n in rows]

    def info(self) -> dict[str, Any]:
        return {"providers": self.providers, "generation": "kv_cache" if self._batcher is None else "recompute",
                "architecture": self.encdec.architecture,
                "fill_mask": "beam_search_spans", "max_source_length": self.encdec.max_source_length,
                "max_target_length": self.encdec.max_target_length}
