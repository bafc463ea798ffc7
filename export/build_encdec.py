"""`plm build` for the `encdec` family: its own BPE tokenizer with sentinels, the Transformer encoder-decoder
pretrained by span corruption, the encoder and decoder-with-past graphs, and held-out infilling figures.

`build()` writes the model folder `encdec` (tokenizer.json, encoder.onnx, decoder.onnx, weights.npz,
loss_curve.png, manifest.json) atomically. Training is a fixed number of steps from the seed (`max_seconds` is
a safety cap only), so one seed gives one model. The RNN seq2seq of the same family is trained beside it by
benchmarks/encdec_report.py for the comparison; only the Transformer is exported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from plm.export.build import BuildData
from plm.export.repository import staging, write_manifest
from plm.models import tokenization

if TYPE_CHECKING:  # torch is imported only when a build runs
    from plm.models.span_corruption import SpecialTokens
    from plm.models.transformer import Transformer
    from tokenizers import Tokenizer

log = logging.getLogger("plm.build")

NAME = "encdec"


@dataclass(frozen=True)
class EncDecProfile:
    vocab_size: int
    sentinels: int
    max_tokens: int  # a sentence's tokens kept before corruption: the source is at most this + 1 long
    n_layer: int  # encoder layers, and decoder layers
    n_head: int
    d_model: int
    batch_size: int
    max_steps: int
    warmup_steps: int
    max_seconds: float | None  # a safety cap that warns when it cuts training short; None: no cap
    eval_interval: int
    lr: float
    eval_sentences: int  # held-out test sentences the infilling figures are taken on
    num_threads: int


PROFILES = {
    # A test fixture: seconds of training; its figures mean nothing, its graphs and contract are the real ones.
    "tiny": EncDecProfile(vocab_size=512, sentinels=16, max_tokens=32, n_layer=2, n_head=2, d_model=32,
                          batch_size=16, max_steps=60, warmup_steps=10, max_seconds=None, eval_interval=30,
                          lr=3e-3, eval_sentences=32, num_threads=1),
    # The opt-in default: the whole corpus, about ten minutes of 2 idle cores (a step is about a second), the
    # cap far enough above it that a busy machine still trains the planned steps.
    "small": EncDecProfile(vocab_size=4096, sentinels=32, max_tokens=64, n_layer=3, n_head=4, d_model=128,
                           batch_size=32, max_steps=600, warmup_steps=60, max_seconds=1800.0, eval_interval=60,
                           lr=1e-3, eval_sentences=500, num_threads=2),
    # `full`: the same model trained for the steps its curves ask for (about 40 minutes of 2 cores).
    "full": EncDecProfile(vocab_size=4096, sentinels=32, max_tokens=64, n_layer=3, n_head=4, d_model=128,
                          batch_size=32, max_steps=2400, warmup_steps=100, max_seconds=5400.0, eval_interval=200,
                          lr=1e-3, eval_sentences=500, num_threads=2),
}


def special_tokens(tok: Tokenizer, sentinels: int) -> SpecialTokens:
    """The objective's ids in `tok` (models/tokenization.py `train_encdec_tokenizer`)."""
    from plm.models.span_corruption import SpecialTokens

    ids = [tok.token_to_id(t) for t in (*tokenization.ENCDEC_SPECIALS, tokenization.sentinel(0))]
    if any(i is None for i in ids):
        raise ValueError("the encoder-decoder tokenizer lacks one of its specials")
    pad, bos, eos, first = (int(i) for i in ids if i is not None)
    return SpecialTokens(pad=pad, bos=bos, eos=eos, first_sentinel=first, sentinels=sentinels)


def encode(tok: Tokenizer, sentences: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(sentences, add_special_tokens=False)]


def build(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Train, export and evaluate the Transformer encoder-decoder on `data`; returns {"encdec": manifest}."""
    import torch
    from plm.export.encdec_export import export_encdec
    from plm.models.span_corruption import held_out, infilling_figures, span_batches
    from plm.models.train import TrainConfig, train
    from plm.models.transformer import Transformer, TransformerConfig

    p = PROFILES[profile]
    started = time.perf_counter()
    tok = tokenization.train_encdec_tokenizer(data.corpus.train, vocab_size=p.vocab_size, sentinels=p.sentinels)
    specials = special_tokens(tok, p.sentinels)
    splits = {split: encode(tok, getattr(data.corpus, split)) for split in ("train", "valid", "test")}
    if sum(len(s) >= 2 for s in splits["valid"]) < 2:  # a tiny corpus may leave almost nothing for validation
        splits["valid"] = splits["train"]
    log.info("encdec: BPE vocab %d, %d train sentences (%.1fs)", tok.get_vocab_size(), len(splits["train"]),
             time.perf_counter() - started)
    # The target is at most the noise plus a sentinel per span plus </s>: well under the sentence's length.
    cfg = TransformerConfig(vocab_size=tok.get_vocab_size(), max_position=p.max_tokens + 1, n_encoder_layer=p.n_layer,
                            n_decoder_layer=p.n_layer, n_head=p.n_head, d_model=p.d_model, d_ff=4 * p.d_model,
                            pad_id=specials.pad, bos_id=specials.bos, eos_id=specials.eos,
                            first_sentinel=specials.first_sentinel, sentinels=specials.sentinels)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    tcfg = TrainConfig(max_steps=p.max_steps, batch_size=p.batch_size, lr=p.lr, min_lr=p.lr / 10,
                       warmup_steps=p.warmup_steps, eval_interval=p.eval_interval, eval_batches=4,
                       max_seconds=p.max_seconds, seed=seed, num_threads=p.num_threads, patience=None,
                       device=data.device)
    get_batch = span_batches(splits, p.batch_size, np.random.default_rng(seed), specials, p.max_tokens)
    with staging(repository, NAME) as folder:
        result = train(model, get_batch, tcfg, folder, desc=NAME)
        graphs = export_encdec(model, folder)
        np.savez(folder / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
        tokenization.save(tok, folder / "tokenizer.json")
        test = held_out(splits["test"], specials, p.max_tokens, seed + 1, p.eval_sentences)
        evaluation = {f"test_{k}": v for k, v in infilling_figures(model, test, specials).items()}
        if not onnx_greedy_agrees(model, folder, test[:8]):
            raise RuntimeError("encdec: greedy tokens through ONNX Runtime differ from PyTorch's")
        evaluation["greedy_onnx_equals_torch"] = True
        manifest = write_manifest(folder, manifest_for(model, graphs, result.manifest(
            model.num_params(), objective="T5 span corruption (15% noise, mean span 3)"), evaluation, key,
            data.corpus.manifest.get("corpus_sha256", "")))
    log.info("encdec: test infilling exact match %s, token accuracy %s (%.1fs in all)",
             evaluation["test_exact_match"], evaluation["test_token_accuracy"], time.perf_counter() - started)
    return {NAME: manifest}


def manifest_for(model: Transformer, graphs: dict[str, dict[str, Any]], training: dict[str, Any],
                 evaluation: dict[str, Any], key: str, corpus_sha256: str) -> dict[str, Any]:
    cfg = model.config
    return {
        "name": NAME, "family": "encdec", "tasks": ["generate", "fill_mask", "score"],
        "description": f"Transformer encoder-decoder {cfg.n_encoder_layer}+{cfg.n_decoder_layer} layers × "
                       f"{cfg.d_model}, {model.num_params():,} parameters",
        "max_length": cfg.max_position, "vocab_size": cfg.vocab_size,
        "tokenizer": {"file": "tokenizer.json", "kind": "bpe", "bos": tokenization.ENCDEC_BOS,
                      "eos": tokenization.ENCDEC_EOS, "pad": tokenization.ENCDEC_PAD},
        "graphs": graphs,
        "encdec": {"architecture": "transformer", "pad_id": cfg.pad_id, "decoder_start_id": cfg.bos_id,
                   "eos_id": cfg.eos_id, "first_sentinel_id": cfg.first_sentinel, "sentinels": cfg.sentinels,
                   "max_source_length": cfg.max_position, "max_target_length": cfg.max_position},
        "weights": "weights.npz",
        "parity": graphs["decoder"]["parity"],
        "config": asdict(cfg),
        "training": training,
        "evaluation": evaluation,
        "build_key": key, "corpus_sha256": corpus_sha256,
    }


def onnx_greedy_agrees(model: Transformer, folder: Path, examples: list[tuple[list[int], list[int]]]) -> bool:
    """Greedy tokens through ONNX Runtime (cached, and recomputed) equal PyTorch's, for the sources batched."""
    from plm.export.encdec_export import OnnxGreedy
    from plm.models.span_corruption import collate

    if not examples:
        return True
    cfg = model.config
    source, mask, _, _ = collate(examples, model.specials)
    want = model.generate(source, mask, cfg.max_position, use_cache=False).numpy()
    runner = OnnxGreedy(folder, cfg.n_decoder_layer, cfg.n_head, cfg.d_model // cfg.n_head, cfg.bos_id, cfg.eos_id,
                        cfg.pad_id)
    return all(np.array_equal(runner.generate(source.numpy(), mask.numpy(), cfg.max_position, use_cache=c), want)
               for c in (True, False))
