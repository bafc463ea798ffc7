"""`plm build`: corpus → tokenizers → models → exported, checked model folders in the repository.

Each family builds into its own folder(s) atomically (export/repository.py) and is skipped when a build
with the same key (profile, seed, corpus files, order) is already there — the `make serve` cache. The end
of the build prints a summary table with each model's held-out per-word perplexity on the same test text.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from plm.data import corpus as corpus_mod
from plm.export.repository import build_key, is_current, staging, write_manifest
from plm.export.variants import MAKERS, add_variants, applicable
from plm.models import tokenization
from plm.service.contract import manifest as contract

log = logging.getLogger("plm.build")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# family → (the model folders it writes, its builder `build(data, profile, repository, key, seed)`), in the
# order of the lineage; each builder module is imported only when its family is built.
FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "ngram": (("ngram-kn", "ngram-laplace"), "plm.export.build:build_ngram"),
    "nnlm": (("nnlm",), "plm.export.build_nnlm:build"),
    "word2vec": (("word2vec-cbow", "word2vec-skipgram"), "plm.export.build_word2vec:build"),
    "elmo": (("elmo",), "plm.export.build_elmo:build"),
    "gpt": (("gpt",), "plm.export.build:build_gpt"),
    "bert": (("bert",), "plm.export.build_bert:build"),
    "encdec": (("encdec",), "plm.export.build_encdec:build"),
    "classifier": (("classifier",), "plm.export.build_classifier:build"),
}
# Built only when named (`--families encdec`): the server serves the family (service/families/encdec.py), but
# building it by default would lengthen every tiny test repository and the small build; its tests build their own.
# The classifier fine-tunes the repository's BERT on the downstream task (export/build_classifier.py): named after
# bert, or with a bert already built; its tests build their own.
OPT_IN = ("encdec", "classifier")
# Families trained from another family's model in the same repository: their build key covers that model's
# manifest, so a rebuilt or re-imported base rebuilds them (and a base built in the same run always does).
BASED_ON = {"classifier": "bert"}
# Families whose training runs on one torch thread (small matmuls: a second thread on a shared core costs more
# than it gives): built side by side, a pair fills two cores (_build_families).
SIDE_BY_SIDE = ("nnlm", "elmo")


@dataclass(frozen=True)
class GptProfile:
    bpe_vocab: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    batch_size: int
    max_steps: int  # the planned run: training stops here (or on early stopping), so the model is the seed's
    warmup_steps: int
    max_seconds: float | None  # a safety cap that warns when it cuts training short; None: no cap
    eval_interval: int
    lr: float
    num_threads: int  # torch threads: 1 for the fixture, where a 2nd thread waits on a busy core every step
    dropout: float = 0.0  # none for runs of about an epoch; a run of several epochs over the corpus overfits without


@dataclass(frozen=True)
class Profile:
    name: str
    max_documents: int | None  # None = the whole corpus
    word_min_count: int
    ngram_order: int
    gpt: GptProfile
    variant_sentences: int = 200  # held-out sentences each optimised variant is measured on


PROFILES = {
    # Everything in well under a minute: the test fixture. Tiny profiles stop at max_steps, never on the clock,
    # so the fixture is the same model on a fast machine and on a loaded CI runner.
    "tiny": Profile("tiny", max_documents=8, word_min_count=1, ngram_order=3, gpt=GptProfile(
        bpe_vocab=512, block_size=64, n_layer=2, n_head=2, n_embd=64, batch_size=16, max_steps=300,
        warmup_steps=30, max_seconds=None, eval_interval=50, lr=3e-3, num_threads=1), variant_sentences=40),
    # The default models: the whole corpus; GPT sized to train in about 2 minutes on 2 idle cores (every family
    # together must build from a fresh clone within 10 minutes). The cap is far above that, for a busy machine.
    # An 8k BPE vocabulary: at the same steps and seed its held-out per-word perplexity is far below a 4k one's
    # (a word is fewer pieces to get right), which outweighs its costlier LM head (docs/benchmarks.md).
    "small": Profile("small", max_documents=None, word_min_count=2, ngram_order=3, gpt=GptProfile(
        bpe_vocab=8000, block_size=128, n_layer=4, n_head=4, n_embd=128, batch_size=32, max_steps=300,
        warmup_steps=20, max_seconds=600.0, eval_interval=40, lr=2e-3, num_threads=2)),
    # The lineage's claims, not the 10-minute budget: a 256-token window (room for 8-shot prompts), a wider
    # and deeper GPT and every family trained for many more steps; sized for about an hour and a half on 2
    # cores, and `--device auto` trains on a GPU when torch sees one.
    "full": Profile("full", max_documents=None, word_min_count=2, ngram_order=3, gpt=GptProfile(
        bpe_vocab=8000, block_size=256, n_layer=6, n_head=6, n_embd=192, batch_size=16, max_steps=1500,
        warmup_steps=100, max_seconds=3000.0, eval_interval=100, lr=2e-3, num_threads=2, dropout=0.1),
        variant_sentences=400),
}


@dataclass
class BuildData:
    corpus: corpus_mod.Corpus
    word_tokenizer: Any
    words: dict[str, list[list[str]]]  # split -> sentences as words
    cache_dir: Path = Path("cache")  # downloads (e.g. the word-similarity sets the word2vec evaluation fetches)
    device: str = "cpu"  # where the neural families train (models.train.resolve_device); export is on the CPU


def prepare_data(profile: Profile, corpus_files: Sequence[Path] | None, cache_dir: Path, seed: int) -> BuildData:
    """The corpus and the word-level view every model is evaluated on (deterministic)."""
    paths = list(corpus_files) if corpus_files else corpus_mod.fetch_default_sources(cache_dir)
    corpus = corpus_mod.build_corpus(paths, max_documents=profile.max_documents, seed=seed)
    word_tok = tokenization.train_word_tokenizer(corpus.train, min_count=profile.word_min_count)
    words = {split: [w for s in getattr(corpus, split) if (w := tokenization.words(word_tok, s))]
             for split in ("train", "valid", "test")}
    return BuildData(corpus, word_tok, words, cache_dir)


def _source_facts(corpus_files: Sequence[Path] | None, cache_dir: Path) -> list[tuple[str, int]]:
    """Cheap identity of the corpus files (name, size) for the build key, without reading them."""
    if corpus_files:
        return sorted((str(Path(p).resolve()), Path(p).stat().st_size) for p in corpus_files)
    return [("default", 0)]


def build_repository(*, profile: str = "small", repository: Path = Path("repository"),
                     corpus_files: Sequence[Path] | None = None, cache_dir: Path = Path("cache"),
                     families: Sequence[str] | None = None, force: bool = False, seed: int = 0,
                     variants: Sequence[str] = (), device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Build every requested family into `repository`; returns the manifests written (or found current).

    `variants` (int8, fused, fp16: export/variants.py) are added to every model that can have them and lacks
    them, each measured on held-out sentences; a rebuilt model loses its old variants with its old folder.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    prof = PROFILES[profile]
    unknown = [v for v in variants if v not in MAKERS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(MAKERS)}")
    from plm.models.train import resolve_device

    resolve_device(device)  # a device torch cannot see is refused before anything is trained
    for f in families or ():
        if f not in FAMILIES:
            raise ValueError(f"unknown family {f!r}; known: {', '.join(FAMILIES)}")
    # Lineage order, whatever the order asked in: a family built from another comes after it.
    wanted = tuple(f for f in FAMILIES if (f in families if families else f not in OPT_IN))
    facts = {"profile": asdict(prof), "seed": seed, "sources": _source_facts(corpus_files, cache_dir), "schema": 1}
    keys = {f: _family_key(f, facts, repository) for f in wanted}
    todo: list[str] = []
    for f in wanted:
        if (force or BASED_ON.get(f) in todo
                or not all(is_current(repository / n, keys[f]) for n in FAMILIES[f][0])):
            todo.append(f)
    manifests: dict[str, dict[str, Any]] = {}
    for f in wanted:
        if f not in todo:
            for n in FAMILIES[f][0]:
                manifests[n] = contract.dump(contract.load(repository / n / contract.MANIFEST_FILE))
            log.info("%s: up to date in %s (use --force to rebuild)", f, repository)
    data: BuildData | None = None
    if todo:
        started = time.perf_counter()
        data = prepare_data(prof, corpus_files, cache_dir, seed)
        data.device = device
        log.info("corpus: %s sentences train / %s valid / %s test (%.1fs)", len(data.corpus.train),
                 len(data.corpus.valid), len(data.corpus.test), time.perf_counter() - started)
        repository.mkdir(parents=True, exist_ok=True)
        corpus_mod.write_manifest(data.corpus, repository / "corpus.json")
        manifests.update(_build_families(todo, data, profile, repository, facts, keys, seed))
    typed = {n: contract.from_json(m, source=n) for n, m in manifests.items()}
    lacking = [n for n, m in typed.items() if any(applicable(m.family, v) and v not in m.variants for v in variants)]
    if lacking:
        data = data or prepare_data(prof, corpus_files, cache_dir, seed)
        held_out = data.corpus.test[: prof.variant_sentences]
        for name in lacking:
            t0 = time.perf_counter()
            manifests[name] = add_variants(repository / name, variants, held_out)
            log.info("%s: variants %s in %.1fs", name, ", ".join(manifests[name].get("variants", {})),
                     time.perf_counter() - t0)
    _print_summary({n: contract.from_json(m, source=n) for n, m in manifests.items()})
    return manifests


def _family_key(family: str, facts: dict[str, Any], repository: Path) -> str:
    """What `family`'s build depends on: the shared facts and, for a family built from another's model, that
    model's manifest as it is in the repository now (empty when absent)."""
    base = BASED_ON.get(family)
    if base is None:
        return build_key(family=family, **facts)
    manifest = repository / base / contract.MANIFEST_FILE
    return build_key(family=family, **facts, base=manifest.read_text() if manifest.is_file() else "")


def _build_families(todo: Sequence[str], data: BuildData, profile: str, repository: Path, facts: dict[str, Any],
                    keys: dict[str, str], seed: int) -> dict[str, dict[str, Any]]:
    """Run each family's builder in lineage order. When both SIDE_BY_SIDE families are due and the machine has
    two cores, the first trains in a child process while this one builds the second: each trains on a single
    torch thread, so together they fill two cores. The weights are the same as one after the other (one
    thread, the same seed); only the log lines interleave."""
    pair = [f for f in SIDE_BY_SIDE if f in todo]
    manifests: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:  # the child process, only when a pair is due; waited for on the way out
        side: Future[tuple[dict[str, dict[str, Any]], float]] | None = None
        if len(pair) == 2 and (os.cpu_count() or 1) >= 2:
            pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))
            side = pool.submit(_timed_build, FAMILIES[pair[0]][1], data, profile, repository, keys[pair[0]], seed,
                               logging.getLogger().getEffectiveLevel())
            log.info("%s: building in a child process beside %s", pair[0], pair[1])
        for f in todo:
            if side is not None and f == pair[0]:
                continue
            if f in BASED_ON:  # its base may have been built a moment ago
                keys[f] = _family_key(f, facts, repository)
            built, seconds = _timed_build(FAMILIES[f][1], data, profile, repository, keys[f], seed)
            manifests.update(built)
            log.info("%s: built in %.1fs", f, seconds)
            if side is not None and f == pair[1]:
                built, seconds = side.result()  # re-raises the child's failure, whose staging left nothing
                manifests.update(built)
                log.info("%s: built in %.1fs (beside %s)", pair[0], seconds, pair[1])
    return manifests


def _timed_build(spec: str, data: BuildData, profile: str, repository: Path, key: str, seed: int,
                 child_log_level: int | None = None) -> tuple[dict[str, dict[str, Any]], float]:
    """`spec`'s builder (module:function) on the data; its manifests and seconds. In a child process
    (`child_log_level` set), logging is configured first, as the parent's configuration is not inherited."""
    if child_log_level is not None:
        logging.basicConfig(level=child_log_level, format=LOG_FORMAT)
    module, func = spec.split(":")
    t0 = time.perf_counter()
    built = getattr(importlib.import_module(module), func)(data, profile, repository, key, seed)
    return built, time.perf_counter() - t0


def _common(data: BuildData, key: str) -> dict[str, Any]:
    return {"build_key": key, "corpus_sha256": data.corpus.manifest.get("corpus_sha256", "")}


def build_ngram(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    """Kneser-Ney (ARPA) and Laplace (counts) models over the word-level vocabulary."""
    from plm.models.ngram import KneserNeyLM, LaplaceLM, count_ngrams, perplexity

    order = PROFILES[profile].ngram_order
    vocab = [w for w, _ in sorted(data.word_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
             if w != tokenization.PAD]
    started = time.perf_counter()
    counts = count_ngrams(data.words["train"], vocab, order)
    log.info("ngram: counted %d-grams over %d sentences in %.1fs", order, len(data.words["train"]),
             time.perf_counter() - started)
    out: dict[str, dict[str, Any]] = {}
    for name, lm, fmt, file, smoothing in (
        ("ngram-kn", KneserNeyLM(counts), "arpa", "model.arpa", "interpolated modified Kneser-Ney"),
        ("ngram-laplace", LaplaceLM(counts), "counts", "counts.txt", "add-one (Laplace)"),
    ):
        t0 = time.perf_counter()
        with staging(repository, name) as folder:
            if fmt == "arpa":
                lm.write_arpa(folder / file)  # type: ignore[union-attr]
            else:
                lm.write_counts(folder / file)  # type: ignore[union-attr]
            tokenization.save(data.word_tokenizer, folder / "tokenizer.json")
            scorer = lm.to_model()
            evaluation = {
                "valid_word_perplexity": perplexity(scorer, data.words["valid"]),
                "test_word_perplexity": perplexity(scorer, data.words["test"]),
                "test_sentences": len(data.words["test"]),
                "test_words": sum(len(s) for s in data.words["test"]),
            }
            out[name] = write_manifest(folder, {
                "name": name, "family": "ngram", "tasks": ["score", "predict_next"],
                "description": f"{order}-gram, {smoothing}",
                "max_length": 1024, "vocab_size": len(vocab),
                "tokenizer": {"file": "tokenizer.json", "kind": "word", "bos": "<s>", "eos": "</s>", "unk": "<unk>"},
                "ngram": {"file": file, "format": fmt, "order": order, "smoothing": smoothing},
                "training": {"seconds": round(time.perf_counter() - t0, 2),
                             "train_sentences": len(data.words["train"])},
                "evaluation": evaluation, **_common(data, key),
            })
        log.info("%s: test per-word perplexity %.1f (%.1fs)", name, evaluation["test_word_perplexity"],
                 time.perf_counter() - t0)
    return out


def build_gpt(data: BuildData, profile: str, repository: Path, key: str, seed: int) -> dict[str, dict[str, Any]]:
    import torch
    from plm.export.hf_gpt2 import save_weights
    from plm.export.onnx_export import export_gpt, export_gpt_decoder, export_kv_layout
    from plm.models.gpt import GPT, GPTConfig
    from plm.models.train import TrainConfig, lm_batches, train

    g = PROFILES[profile].gpt
    started = time.perf_counter()
    tok = tokenization.train_bpe_tokenizer(data.corpus.train, vocab_size=g.bpe_vocab)
    eot = tok.token_to_id(tokenization.ENDOFTEXT)
    assert eot is not None, "train_bpe_tokenizer always adds <|endoftext|>"

    def stream(sentences: list[str]) -> np.ndarray:
        ids: list[int] = [eot]
        for enc in tok.encode_batch(sentences, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)  # sentences are separated by <|endoftext|>, which is also the BOS when scoring
        return np.asarray(ids, dtype=np.int32)

    streams = {"train": stream(data.corpus.train), "valid": stream(data.corpus.valid)}
    log.info("gpt: BPE vocab %d, %d train tokens (%.1fs)", tok.get_vocab_size(), len(streams["train"]),
             time.perf_counter() - started)
    cfg = GPTConfig(vocab_size=tok.get_vocab_size(), block_size=g.block_size, n_layer=g.n_layer,
                    n_head=g.n_head, n_embd=g.n_embd, dropout=g.dropout)
    torch.manual_seed(seed)
    model = GPT(cfg)
    tcfg = TrainConfig(max_steps=g.max_steps, batch_size=g.batch_size, lr=g.lr, min_lr=g.lr / 10,
                       warmup_steps=g.warmup_steps, eval_interval=g.eval_interval, eval_batches=5,
                       max_seconds=g.max_seconds, seed=seed, num_threads=g.num_threads, device=data.device)
    with staging(repository, "gpt") as folder:
        result = train(model, lm_batches(streams, g.block_size, g.batch_size, np.random.default_rng(seed)),
                       tcfg, folder, desc="gpt")
        graph = export_gpt(model, folder / "model.onnx")
        decoder = export_gpt_decoder(model, folder / "decoder.onnx")  # KV-cache generation
        save_weights(model, folder / "weights.npz")  # for oracles and benchmarks; the server never reads it
        tokenization.save(tok, folder / "tokenizer.json")
        valid_ppl = gpt_word_perplexity(model, tok, data.corpus.valid, data.words["valid"])
        test_ppl = gpt_word_perplexity(model, tok, data.corpus.test, data.words["test"])
        manifest = write_manifest(folder, {
            "name": "gpt", "family": "gpt", "tasks": ["score", "predict_next", "generate", "embed"],
            "description": f"GPT {cfg.n_layer} layers × {cfg.n_embd}, {model.num_params():,} parameters",
            "max_length": cfg.block_size, "vocab_size": cfg.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "kind": "bpe", "bos": tokenization.ENDOFTEXT,
                          "eos": tokenization.ENDOFTEXT, "pad": tokenization.ENDOFTEXT},
            "graphs": {"model": graph, "decoder": decoder,
                       "kv_layout": export_kv_layout(folder / "kv_layout.onnx", 2 * cfg.n_layer)},
            "weights": "weights.npz",
            "parity": {**graph.get("parity", {}), "max_abs_diff": max(graph["parity"]["max_abs_diff"],
                                                                   decoder["parity"]["max_abs_diff"])},
            "config": asdict(cfg),
            "training": result.manifest(model.num_params()),
            "evaluation": {"valid_word_perplexity": valid_ppl, "test_word_perplexity": test_ppl,
                           "test_sentences": len(data.words["test"])},
            **_common(data, key),
        })
    log.info("gpt: test per-word perplexity %.1f (%.1fs in all)", test_ppl, time.perf_counter() - started)
    return {"gpt": manifest}


def gpt_word_perplexity(model: Any, tok: Any, sentences: list[str], word_sents: list[list[str]]) -> float:
    """exp(−Σ ln P(tokens, EOS | BOS) / Σ (words + 1)): per *word* (the word-level count), as for n-grams."""
    import torch
    from plm.models.train import pad_right

    eot = tok.token_to_id(tokenization.ENDOFTEXT)
    seqs = [[eot, *e.ids, eot] for e in tok.encode_batch(sentences, add_special_tokens=False) if e.ids]
    seqs = [s[: model.config.block_size] for s in seqs]
    total = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(seqs), 64):
            ids, mask = pad_right(seqs[i: i + 64], pad=eot)
            logits = model(ids, attention_mask=mask)
            logits = logits[0] if isinstance(logits, tuple) else logits
            lp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            total += float((lp * mask[:, 1:]).sum())
    n = sum(len(w) + 1 for w in word_sents)
    return math.exp(-total / n)


def _print_summary(manifests: dict[str, contract.Manifest]) -> None:
    rows = [(n, m.description, m.evaluation.get("test_word_perplexity"))
            for n, m in sorted(manifests.items())]
    width = max((len(r[1]) for r in rows), default=10)
    print(f"\n{'model':16} {'what':{width}}  test per-word perplexity")
    for name, what, ppl in rows:
        print(f"{name:16} {what:{width}}  {ppl:.1f}" if ppl is not None else f"{name:16} {what:{width}}  -")
    print()
