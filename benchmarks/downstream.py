"""Pretraining → downstream: frozen vs fine-tuned, on one labelled task split by work.

    python benchmarks/downstream.py [--repository repository] [--profile small] [--out results/downstream.json]

The task (plm.data.downstream): the kind of text a passage comes from — comedy, tragedy, history, poetry (by
Shakespeare work) or news (Lee articles) —, test passages from works no method trained on. On the same
split, with the models of `--repository`:

  (a) the majority class of the training passages;
  (b) word2vec (word2vec-skipgram): the mean of a passage's word vectors, then logistic regression;
  (c) frozen BERT: its [CLS] (pooler) or mean vector as fixed features, then logistic regression;
  (d) BERT fine-tuned with a linear head (models/classifier.py, the recipe of export/build_classifier.py's
      profile): every layer learning, and the lower half of the layers (and the embeddings) frozen;
  (e) GPT in context (no training): `Classify` on a served gpt with 0 and one-per-label demonstrations,
      plain and calibrated; passages cut to their first `--gpt-words` words so demonstrations fit its window.

Each row: accuracy and macro-F1 over the five labels, accuracy on the Shakespeare passages (genre), accuracy
of Shakespeare vs news (a genre counts as Shakespeare), and the seconds spent training (features included)
and predicting. Written to `--out` (JSON), the same name with .md (the table) and .png (accuracy bars).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import torch
from _smoke import add_smoke_flag, bar_plot, check_threads, run  # this folder is on sys.path as a script
from plm.client.client import PlmClient
from plm.client.local_server import LocalServer
from plm.data import downstream
from plm.export import build_classifier
from plm.models import classifier as clf
from plm.models import tokenization
from plm.service.contract import manifest as contract

from plm.api.v1 import plm_pb2 as pb

TEMPLATE = "{text} = {label}\n"


def row(method: str, task: downstream.DownstreamTask, predicted: list[str], train_s: float, predict_s: float,
        **extra: Any) -> dict[str, Any]:
    figures = build_classifier.evaluate(task, predicted)
    out = {"method": method, "accuracy": figures["test_accuracy"], "macro_f1": figures["test_macro_f1"],
           "genre_accuracy": figures["test_genre_accuracy"], "source_accuracy": figures["test_source_accuracy"],
           "train_seconds": round(train_s, 2), "predict_seconds": round(predict_s, 2), **extra}
    print(f"{method:44s} acc {out['accuracy']:.3f}  macro-F1 {out['macro_f1']:.3f}  genre {out['genre_accuracy']:.3f}"
          f"  source {out['source_accuracy']:.3f}  train {train_s:7.1f} s  predict {predict_s:6.1f} s", flush=True)
    return out


def labels_of(task: downstream.DownstreamTask, split: str) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(task.labels)}
    return np.array([index[p.label] for p in getattr(task, split)], dtype=np.int64)


def majority(task: downstream.DownstreamTask) -> dict[str, Any]:
    train = [p.label for p in task.train]
    top = max(task.labels, key=train.count)
    return row(f"(a) majority class ({top})", task, [top] * len(task.test), 0.0, 0.0)


def probe(method: str, task: downstream.DownstreamTask, feats: dict[str, np.ndarray], feature_s: float,
          test_feature_s: float) -> dict[str, Any]:
    """Logistic regression on fixed features; training time includes the train/valid features' extraction."""
    started = time.perf_counter()
    fitted = clf.linear_probe(feats["train"], labels_of(task, "train"), feats["valid"], labels_of(task, "valid"),
                              len(task.labels))
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    predicted = [task.labels[i] for i in fitted.logits(feats["test"]).argmax(1)]
    return row(method, task, predicted, feature_s + fit_s, test_feature_s + time.perf_counter() - started,
               l2=fitted.l2)


def word2vec_rows(task: downstream.DownstreamTask, folder: Path) -> list[dict[str, Any]]:
    """(b): mean of the passage's in-vocabulary word vectors (unit length each; the tokenizer's words are mapped
    to the vectors' ids through vocab.json, as the server does), logistic regression."""
    spec = contract.load(folder / contract.MANIFEST_FILE)
    section = contract.require(spec.word2vec, "word2vec", folder)
    started = time.perf_counter()
    tok = tokenization.load(folder / spec.tokenizer.file)
    session = ort.InferenceSession(str(folder / spec.graphs["vectors"].file), providers=["CPUExecutionProvider"])
    table = session.run(["vectors"], {"input_ids": np.arange(spec.vocab_size, dtype=np.int64)})[0]  # (V, D)
    vocab = json.loads((folder / section.vocab_file).read_text(encoding="utf-8"))  # id -> word
    word_to_id = {w: i for i, w in enumerate(vocab)}
    table_s = time.perf_counter() - started
    feats: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for split in downstream.SPLITS:
        started = time.perf_counter()
        rows = []
        for enc in tok.encode_batch([p.text for p in getattr(task, split)]):
            ids = [i for t in enc.tokens if (i := word_to_id.get(t, section.unk_id)) != section.unk_id]
            rows.append(table[ids].mean(0) if ids else np.zeros(table.shape[1], dtype=np.float32))
        feats[split] = np.stack(rows)
        seconds[split] = time.perf_counter() - started
    return [probe(f"(b) {folder.name} mean + logistic regression", task, feats,
                  table_s + seconds["train"] + seconds["valid"], seconds["test"])]


def bert_rows(task: downstream.DownstreamTask, folder: Path, p: build_classifier.ClassifierProfile,
              seed: int) -> list[dict[str, Any]]:
    """(c) frozen features + logistic regression, (d) fine-tuned with lower layers frozen or not."""
    torch.set_num_threads(p.num_threads)
    bert = clf.bert_from_onnx(folder)
    tok = tokenization.load(folder / "tokenizer.json")
    splits = build_classifier.encode_task(task, tok, bert.config.max_position)
    out = []
    for pooling in ("cls", "mean"):
        model = clf.BertClassifier(bert, task.labels, pooling=pooling)  # type: ignore[arg-type]
        feats: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        for split in downstream.SPLITS:
            started = time.perf_counter()
            feats[split] = clf.predict(model, splits[split].rows, features=True)
            seconds[split] = time.perf_counter() - started
        what = "[CLS] (pooler)" if pooling == "cls" else "mean"
        out.append(probe(f"(c) frozen {folder.name} {what} + logistic regression", task, feats,
                         seconds["train"] + seconds["valid"], seconds["test"]))
    n = bert.config.n_layer
    for frozen in (0, n // 2):
        torch.manual_seed(seed)
        model = clf.BertClassifier(copy.deepcopy(bert), task.labels, pooling=p.pooling,  # type: ignore[arg-type]
                                   dropout=p.dropout)
        clf.freeze(model, frozen)
        started = time.perf_counter()
        result = clf.fine_tune(model, splits, build_classifier.train_config(p, seed), Path("/tmp") / "downstream",
                               desc=f"fine-tune-{frozen}")
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        predicted = [task.labels[i] for i in clf.predict(model, splits["test"].rows).argmax(1)]
        what = "all layers" if frozen == 0 else f"embeddings + lower {frozen} of {n} layers frozen"
        out.append(row(f"(d) {folder.name} fine-tuned, {what}", task, predicted, train_s,
                       time.perf_counter() - started, frozen_layers=frozen, steps=result.steps,
                       trainable_parameters=clf.trainable_parameters(model)))
    return out


def gpt_rows(task: downstream.DownstreamTask, repository: Path, model: str, words: int,
             seed: int) -> list[dict[str, Any]]:
    """(e): Classify on the served GPT, 0 shots and one demonstration per label, plain and calibrated."""
    rng = np.random.default_rng(seed)

    def cut(text: str) -> str:
        return " ".join(text.split()[:words])

    queries = [cut(p.text) for p in task.test]
    demos = []
    for label in task.labels:
        pool = [p for p in task.train if p.label == label]
        demos.append(pb.Demonstration(text=cut(pool[int(rng.integers(len(pool)))].text), label=label))
    out = []
    server = LocalServer(repository, [model])
    try:
        with PlmClient(server.target, timeout=600) as client:
            for shots in (0, len(demos)):
                for calibrate in (False, True):
                    method = f"(e) {model} {shots}-shot in context" + (", calibrated" if calibrate else "")
                    started = time.perf_counter()
                    chosen: list[str] = []
                    try:
                        for i in range(0, len(queries), 32):
                            resp = client.stub.Classify(pb.ClassifyRequest(
                                model=model, queries=queries[i: i + 32], labels=list(task.labels),
                                demonstrations=demos[:shots], template=TEMPLATE, calibrate=calibrate), timeout=600)
                            chosen += [r.label for r in resp.results]
                    except grpc.RpcError as e:
                        out.append({"method": method, "error": f"{e.code().name}: {e.details()}"})
                        print(f"{method}: {out[-1]['error']}")
                        continue
                    out.append(row(method, task, chosen, 0.0, time.perf_counter() - started, shots=shots,
                                   words_per_text=words))
    finally:
        server.stop()
    return out


def markdown(rows: list[dict[str, Any]], task: downstream.DownstreamTask) -> str:
    counts = task.manifest()["passages"]
    lines = [f"Test: {len(task.test)} passages from {len(task.works['test'])} works/articles never trained on "
             f"({json.dumps(counts['test'])}); train {len(task.train)}, valid {len(task.valid)}.", "",
             "| method | accuracy | macro-F1 | genre acc. | Shakespeare vs news | train s | predict s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['genre_accuracy']:.3f} | "
                     f"{r['source_accuracy']:.3f} | {r['train_seconds']:.1f} | {r['predict_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, default=Path("repository"))
    ap.add_argument("--profile", default="small", choices=sorted(build_classifier.PROFILES),
                    help="the classifier profile whose task sizes and fine-tuning recipe are used")
    ap.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ap.add_argument("--gpt-model", default="gpt")
    ap.add_argument("--gpt-words", type=int, default=12, help="words kept of each passage for GPT in context")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/downstream.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    profile = build_classifier.PROFILES[args.profile]
    if args.smoke:  # the tiny recipe, a handful of passages and steps
        args.profile, args.gpt_words = "tiny", 4
        profile = dataclasses.replace(build_classifier.PROFILES["tiny"], max_steps=6, warmup_steps=2,
                                      eval_interval=3, quotas=downstream.Quotas(8, 3, 4, min_words=12, max_words=30))
    started = time.perf_counter()
    task = downstream.default_task(args.cache_dir, profile.quotas, args.seed)
    print(f"task: {json.dumps(task.manifest()['passages'])}", flush=True)
    rows = [majority(task)]
    rows += word2vec_rows(task, args.repository / "word2vec-skipgram")
    rows += bert_rows(task, args.repository / "bert", profile, args.seed)
    rows += gpt_rows(task, args.repository, args.gpt_model, args.gpt_words, args.seed)
    check_threads()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": task.manifest(), "profile": args.profile, "recipe": dataclasses.asdict(profile),
        "repository": str(args.repository),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1), "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, task))
    bar_plot(args.out.with_suffix(".png"), {r["method"][:40]: r["accuracy"] for r in rows if "accuracy" in r},
             "test accuracy", "downstream: genre or news of a held-out passage")
    print(f"written to {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")
    tuned = next(r for r in rows if r.get("frozen_layers") == profile.frozen_layers)
    if not args.smoke and tuned["accuracy"] <= rows[0]["accuracy"]:  # the served recipe must beat the majority
        print(f"FAILED: {tuned['method']} is not above the majority class ({tuned['accuracy']} <= "
              f"{rows[0]['accuracy']})")
        return 1
    return 0


if __name__ == "__main__":
    run(main)
