"""Optimised graph variants of a built model, each with what it costs in accuracy, measured as served.

- `int8`: ONNX Runtime dynamic quantisation — MatMul/Gemm weights to int8, activations quantised per batch at
  run time. Smaller files, faster matrix products on CPUs with VNNI/AVX-512, a small perplexity cost.
- `fused`: ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`): LayerNormalization,
  GELU, SkipLayerNorm, bias and attention fusions where our graphs match its patterns; what fused is recorded.
- `fp16`: weights and activations in float16 with float32 inputs/outputs (`keep_io_types`), meant for
  CUDA/TensorRT. Its parity with the float32 graph must hold within FP16_TOLERANCE on every held-out token's
  log-probability (checked on CPU, where ONNX Runtime 1.32 runs these graphs in fp16; if a build of ONNX
  Runtime cannot run it, the variant is written but not measured, and the manifest says so).

A variant is written beside the exported graph (`model.int8.onnx`) and listed in the manifest under
`variants.NAME.graphs`; the server serves it when `runtime.variant` names it (service/runtime.py: open_graph).
Accuracy is measured through the server's own adapter, loaded from the folder with the variant selected:
held-out sentences are scored exactly as the `Score` RPC scores them (causal log-likelihood for GPT-style
models, pseudo-log-likelihood for BERT), once with the exported graph and once with the variant. The manifest
records both token perplexities, their difference, the largest per-token log-probability change and, for
masked-LM models, the top-1 accuracy of predicting every held-out token from the rest. A model that serves
`Embed` also gets the sentences' vectors as the `Embed` RPC answers them (the model's own pooling): the
smallest and mean cosine of the variant's vectors to the exported graph's, and, where the caller has vectors
from the source framework (an imported sentence-transformers model: `Reference`), to those as well. An
embedding-only model (an imported BertModel) is measured by its vectors alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from plm.service.contract import manifest as contract
from plm.service.contract.manifest import Manifest

log = logging.getLogger(__name__)

# fp16 keeps 11 significant bits (~5e-4 relative per operation); through a few layers and a log-softmax over
# thousands of words, held-out token log-probabilities move by ~1e-3 (2.3e-3 on the tiny GPT). 2e-2 still
# catches a wrong graph (a dropped cast or an overflowed attention score moves them by whole units).
FP16_TOLERANCE = 2e-2
# The same check on an embedding-only model: a healthy fp16 graph keeps every sentence vector's direction far
# closer than this; a wrong one (a dropped cast, an overflow) leaves vectors at cosines well below it.
FP16_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Reference:
    """Vectors of the measured sentences from the source framework, to compare each variant's with."""

    name: str  # what produced them, e.g. "sentence-transformers 5.1.0 encode"
    vectors: np.ndarray  # (N, D), row i for sentences[i]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer and optimizer log every tensor at INFO and advice on the root logger: keep the build's
    own log readable."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)

# family → graph keys each variant rewrites. Families left out have no variants (their graphs are tiny).
GRAPHS = {"gpt": ("model", "decoder"), "bert": ("model",), "nnlm": ("model",)}
TRANSFORMERS = {"gpt": "gpt2", "bert": "bert"}  # the optimizer's model_type for the transformer families


def _int8(src: Path, dst: Path, manifest: Manifest) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul/Gemm only: quantising the embedding Gather would also quantise the tied output projection's
    # source and cost far more perplexity than it saves time. One scale per output channel: with one per
    # tensor, a pretrained checkpoint's few large-magnitude columns set the step for every column, and sentence
    # vectors turn by far more (the per-model cosines are in the manifest) at no gain in speed.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     per_channel=True)
    return {}


def _fused(src: Path, dst: Path, manifest: Manifest) -> dict[str, Any]:
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = manifest.config  # our own builds' names, or an imported Hugging Face config's
    heads, hidden = cfg.get("n_head", cfg.get("num_attention_heads")), cfg.get("n_embd", cfg.get("hidden_size"))
    opt = optimize_model(str(src), model_type=TRANSFORMERS[manifest.family], num_heads=int(heads),
                         hidden_size=int(hidden), opt_level=1, use_gpu=False)
    opt.save_model_to_file(str(dst))
    fused = {op: n for op, n in opt.get_fused_operator_statistics().items() if n}
    return {"fused_operators": fused}


def _fp16(src: Path, dst: Path, manifest: Manifest) -> dict[str, Any]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return {}


MAKERS: dict[str, Callable[[Path, Path, Manifest], dict[str, Any]]] = {
    "int8": _int8, "fused": _fused, "fp16": _fp16,
}


def applicable(family: str, variant: str) -> bool:
    """int8 for every family with graphs to rewrite; fused and fp16 for the transformers only."""
    return family in GRAPHS and (variant == "int8" or family in TRANSFORMERS)


def _save(path: Path, manifest: dict[str, Any]) -> None:
    """Validate the manifest's JSON (as a server would read it) and write it."""
    contract.write(path.parent, contract.from_json(manifest, source=str(path)))


def measure(folder: Path, variant: str, sentences: Sequence[str]) -> dict[str, Any]:
    """Score `sentences` through the server's adapter for this folder, serving `variant` ("" = exported), and
    embed them as `Embed` does where the model serves it (`vectors`: (n, D), row j for sentences[index[j]])."""
    from plm.service.config import Runtime, ServerConfig
    from plm.service.families.capabilities import MaskFiller, Scorer
    from plm.service.metrics import Metrics
    from plm.service.registry import load_model
    from plm.service.tasks.embed import EmbedParams, embed

    async def run(folder: Path) -> dict[str, Any]:
        config = ServerConfig(repository=folder.parent, runtime=Runtime(providers=("CPUExecutionProvider",),
                                                                        variant=variant))
        adapter = load_model(folder, config, Metrics())
        await adapter.start()
        try:
            out: dict[str, Any] = {"served_variant": adapter.variant}
            if "embed" in adapter.tasks:
                # Embed refuses over-long text unless the model truncates (an imported sentence-transformers one)
                truncates = bool((adapter.spec.extra.get("embedding") or {}).get("truncate"))
                lengths = [len(adapter.encode(s).ids) for s in sentences]
                index = [i for i, n in enumerate(lengths) if n and (truncates or n <= adapter.context_budget)]
                started = time.perf_counter()
                got = await embed(adapter, EmbedParams(texts=tuple(sentences[i] for i in index)), None)
                out |= {"vectors": np.stack([np.asarray(e.vector) for e in got.embeddings]),
                        "vector_index": index, "embed_seconds": time.perf_counter() - started}
            if "score" not in adapter.tasks:
                return out
            seqs = [ids for s in sentences if (ids := adapter.encode(s).ids[: adapter.context_budget - 1])]
            started = time.perf_counter()
            scores = await Scorer.of(adapter).score(seqs, True, None)
            out |= {"log_probs": np.concatenate([s.log_probs for s in scores]),
                    "score_seconds": time.perf_counter() - started}
            if isinstance(adapter, MaskFiller) and "fill_mask" in adapter.tasks:  # top-1 of every held-out token
                hits = total = 0  # predicted from the rest
                for seq in seqs:
                    rows = [[*seq[:i], adapter.mask_id, *seq[i + 1:]] for i in range(len(seq))]
                    lps = await adapter.mask_logprobs(rows, [[i] for i in range(len(seq))], None)
                    hits += sum(int(lp[0].argmax() == t) for lp, t in zip(lps, seq, strict=True))
                    total += len(seq)
                out["mlm_top1"] = hits / max(1, total)
            return out
        finally:
            await adapter.close()

    with _named(folder) as named:
        return asyncio.run(run(named))


@contextlib.contextmanager
def _named(folder: Path) -> Iterator[Path]:
    """`folder` under its model's name: the server loads a folder only under the name its manifest gives, and
    an import measures its variants in the staging folder (`.NAME.building`), through a link named NAME."""
    name = contract.load(folder / contract.MANIFEST_FILE).name
    if name == folder.name:
        yield folder
        return
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / name
        link.symlink_to(folder.resolve(), target_is_directory=True)
        yield link


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) and (N, D) -> (N,); two zero vectors (a text of unknown words only, pooled
    without its specials) are the same answer, cosine 1."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    return np.where(both_zero, 1.0, np.einsum("nd,nd->n", a, b) / np.maximum(norms, 1e-30))


def _score_accuracy(base: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Perplexity, log-prob and (masked LMs) top-1 changes of the variant's Score against the exported graph's."""
    ppl, base_ppl = (math.exp(-float(m["log_probs"].mean())) for m in (got, base))
    accuracy = {
        "test_token_perplexity": ppl, "exported_test_token_perplexity": base_ppl,
        "test_token_perplexity_delta": ppl - base_ppl,
        "max_abs_logprob_diff": float(np.abs(got["log_probs"] - base["log_probs"]).max()),
        "score_speedup": base["score_seconds"] / max(got["score_seconds"], 1e-9),
        "test_tokens": int(got["log_probs"].size),
    }
    if "mlm_top1" in got:
        accuracy |= {"test_mlm_top1": got["mlm_top1"], "exported_test_mlm_top1": base["mlm_top1"],
                     "test_mlm_top1_delta": got["mlm_top1"] - base["mlm_top1"]}
    return accuracy


def _embed_accuracy(base: dict[str, Any], got: dict[str, Any], reference: Reference | None) -> dict[str, Any]:
    """Cosines of the variant's Embed vectors to the exported graph's (and to the reference's, if any)."""
    to_exported = _cosines(got["vectors"], base["vectors"])
    accuracy: dict[str, Any] = {"min_cosine_to_exported": float(to_exported.min()),
                                "mean_cosine_to_exported": float(to_exported.mean()),
                                "embedded_texts": len(got["vector_index"])}
    if reference is not None:
        ref = reference.vectors[got["vector_index"]]
        to_ref, exported_to_ref = _cosines(got["vectors"], ref), _cosines(base["vectors"], ref)
        accuracy |= {"min_cosine_to_reference": float(to_ref.min()), "mean_cosine_to_reference": float(to_ref.mean()),
                     "exported_min_cosine_to_reference": float(exported_to_ref.min()), "reference": reference.name}
    return accuracy


def _broken(variant: str, accuracy: dict[str, Any]) -> str | None:
    """Why a measured fp16 graph is wrong (never left listed), or None."""
    if variant != "fp16":
        return None
    if accuracy.get("max_abs_logprob_diff", 0.0) > FP16_TOLERANCE:
        return f"differs from float32 by {accuracy['max_abs_logprob_diff']:.3g} > {FP16_TOLERANCE:g} in log-prob"
    if "max_abs_logprob_diff" not in accuracy and accuracy.get("min_cosine_to_exported", 1.0) < FP16_MIN_COSINE:
        return f"has a vector at cosine {accuracy['min_cosine_to_exported']:.6f} < {FP16_MIN_COSINE} to float32's"
    return None


def add_variants(folder: Path, variants: Sequence[str], sentences: Sequence[str],
                 reference: Reference | None = None) -> dict[str, Any]:
    """Write each requested variant of the model in `folder`, measure it, and record it in the manifest.

    `reference`: the source framework's vectors of `sentences`, for a model that serves Embed."""
    path = folder / contract.MANIFEST_FILE
    current = contract.load(path)
    manifest = contract.dump(current)  # the JSON that gains the variants
    family = current.family
    todo = [v for v in variants if applicable(family, v) and v not in current.variants]
    if not todo:
        return manifest
    base = measure(folder, "", sentences)
    for variant in todo:
        started = time.perf_counter()
        graphs: dict[str, str] = {}
        facts: dict[str, Any] = {}
        for key in GRAPHS[family]:
            if key not in current.graphs:
                continue
            src = folder / current.graphs[key].file
            dst = src.with_name(f"{src.stem}.{variant}.onnx")
            with _quiet():
                facts.update(MAKERS[variant](src, dst, current))
            graphs[key] = dst.name
        spec: dict[str, Any] = {
            "graphs": graphs,
            "bytes": sum((folder / f).stat().st_size for f in graphs.values()),
            "exported_bytes": sum((folder / current.graphs[k].file).stat().st_size for k in graphs),
            **facts,
        }
        manifest.setdefault("variants", {})[variant] = spec
        _save(path, manifest)
        try:
            got = measure(folder, variant, sentences)
        except Exception as e:  # e.g. fp16 on ONNX Runtime's CPU provider: no kernels for most fp16 ops
            spec["accuracy"] = {}
            spec["measured"] = f"not on this machine: {type(e).__name__}: {str(e)[:200]}"
            log.warning("%s: %s variant written but not measured here (%s)", folder.name, variant, e)
        else:
            accuracy = _score_accuracy(base, got) if "log_probs" in got else {}
            if "vectors" in got:
                accuracy |= _embed_accuracy(base, got, reference)
            if variant == "fp16":
                accuracy["parity_tolerance"] = FP16_TOLERANCE if "log_probs" in got else FP16_MIN_COSINE
            if why := _broken(variant, accuracy):  # never leave a broken graph listed
                del manifest["variants"][variant]
                _save(path, manifest)
                for file in graphs.values():
                    (folder / file).unlink()
                raise RuntimeError(f"{folder.name}: the fp16 graph {why}")
            spec["accuracy"] = accuracy
            what = [f"{'pseudo-' if 'mlm_top1' in got else ''}log-likelihood per token"] if "log_probs" in got else []
            what += ["Embed vectors (the model's own pooling) by cosine"] if "vectors" in got else []
            spec["measured"] = ("held-out sentences through the served adapter on CPUExecutionProvider; "
                                + " and ".join(what))
        spec["seconds"] = round(time.perf_counter() - started, 1)
        _save(path, manifest)
        acc = spec["accuracy"]
        shown = (f"token perplexity {acc['test_token_perplexity']:.2f}" if "test_token_perplexity" in acc else
                 f"min cosine to the exported graph {acc['min_cosine_to_exported']:.6f}" if acc else "not measured")
        log.info("%s: %s variant, %.0f%% of the exported size, %s", folder.name, variant,
                 100 * spec["bytes"] / max(1, spec["exported_bytes"]), shown)
    return manifest
