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
masked-LM models, the top-1 accuracy of predicting every held-out token from the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
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
    # source and cost far more perplexity than it saves time.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return {}


def _fused(src: Path, dst: Path, manifest: Manifest) -> dict[str, Any]:
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = manifest.config
    opt = optimize_model(str(src), model_type=TRANSFORMERS[manifest.family], num_heads=int(cfg["n_head"]),
                         hidden_size=int(cfg["n_embd"]), opt_level=1, use_gpu=False)
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
    """Score `sentences` through the server's adapter for this folder, serving `variant` ("" = exported)."""
    from plm.service.config import Runtime, ServerConfig
    from plm.service.families.capabilities import MaskFiller, Scorer
    from plm.service.metrics import Metrics
    from plm.service.registry import load_model

    config = ServerConfig(repository=folder.parent, runtime=Runtime(providers=("CPUExecutionProvider",),
                                                                    variant=variant))

    async def run() -> dict[str, Any]:
        adapter = load_model(folder, config, Metrics())
        await adapter.start()
        try:
            seqs = [ids for s in sentences if (ids := adapter.encode(s).ids[: adapter.context_budget - 1])]
            started = time.perf_counter()
            scores = await Scorer.of(adapter).score(seqs, True, None)
            seconds = time.perf_counter() - started
            out: dict[str, Any] = {"log_probs": np.concatenate([s.log_probs for s in scores]),
                                   "score_seconds": seconds, "served_variant": adapter.variant}
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

    return asyncio.run(run())


def add_variants(folder: Path, variants: Sequence[str], sentences: Sequence[str]) -> dict[str, Any]:
    """Write each requested variant of the model in `folder`, measure it, and record it in the manifest."""
    path = folder / contract.MANIFEST_FILE
    current = contract.load(path)
    manifest = contract.dump(current)  # the JSON that gains the variants
    family = current.family
    todo = [v for v in variants if applicable(family, v) and v not in current.variants]
    if not todo:
        return manifest
    base = measure(folder, "", sentences)
    base_ppl = math.exp(-float(base["log_probs"].mean()))
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
            ppl = math.exp(-float(got["log_probs"].mean()))
            accuracy = {
                "test_token_perplexity": ppl, "exported_test_token_perplexity": base_ppl,
                "test_token_perplexity_delta": ppl - base_ppl,
                "max_abs_logprob_diff": float(np.abs(got["log_probs"] - base["log_probs"]).max()),
                "score_speedup": base["score_seconds"] / max(got["score_seconds"], 1e-9),
                "test_tokens": int(got["log_probs"].size),
            }
            if variant == "fp16":
                accuracy["parity_tolerance"] = FP16_TOLERANCE
                if accuracy["max_abs_logprob_diff"] > FP16_TOLERANCE:  # never leave a broken graph listed
                    del manifest["variants"][variant]
                    _save(path, manifest)
                    for file in graphs.values():
                        (folder / file).unlink()
                    raise RuntimeError(f"{folder.name}: the fp16 graph differs from float32 by "
                                       f"{accuracy['max_abs_logprob_diff']:.3g} > {FP16_TOLERANCE:g} in log-prob")
            if "mlm_top1" in got:
                accuracy |= {"test_mlm_top1": got["mlm_top1"], "exported_test_mlm_top1": base["mlm_top1"],
                             "test_mlm_top1_delta": got["mlm_top1"] - base["mlm_top1"]}
            spec["accuracy"] = accuracy
            spec["measured"] = ("held-out sentences scored through the served adapter on CPUExecutionProvider; "
                                f"{'pseudo-' if 'mlm_top1' in got else ''}log-likelihood per token")
        spec["seconds"] = round(time.perf_counter() - started, 1)
        _save(path, manifest)
        acc = spec["accuracy"]
        log.info("%s: %s variant, %.0f%% of the exported size, token perplexity %s (exported %.2f)", folder.name,
                 variant, 100 * spec["bytes"] / max(1, spec["exported_bytes"]),
                 f"{acc['test_token_perplexity']:.2f}" if acc else "not measured", base_ppl)
    return manifest
