"""`plm import bert`: a Hugging Face BERT checkpoint folder (or a sentence-transformers folder around one) into a
`bert` family model folder, served by service/families/bert.py.

Supported architectures: BertModel (Embed), BertForMaskedLM (+ FillMask, Score), BertForPreTraining (+ next
sentence prediction through the pooler and NSP head). RoBERTa and DistilBERT are refused: their embeddings
(position offset by the padding id, no token types) and heads are not this graph.

The graph is the `bert` family's contract (export/bert_export.py): a wrapper module around the transformers model
gathers the blanks' states before the MLM head and log-softmaxes both heads; an output whose head the checkpoint
lacks is left out of the graph, and the manifest's `tasks` leave out what it would serve.

A sentence-transformers folder (`modules.json`) adds Embed's defaults: its pooling (`1_Pooling/config.json`, mean
over every real column, specials included, or the [CLS] vector), its `Normalize` module and its `max_seq_length`
(over-long text is truncated there, as `SentenceTransformer.encode` does). Its variants (`--variants`) are
measured against `SentenceTransformer(folder).encode` on common.VARIANT_TEXTS, where sentence-transformers is
installed; otherwise against the exported graph alone.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from plm.export.importers.common import (
    VARIANT_TEXTS,
    ImportFailed,
    finish,
    model_folder,
    read_json_file,
    source_identity,
)

if TYPE_CHECKING:
    from plm.export.variants import Reference

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")
_MLM = {"BertForMaskedLM", "BertForPreTraining"}
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]", "pad": "[PAD]", "unk": "[UNK]"}
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "mask_positions")


def read_architecture(config: dict[str, Any], path: Path, supported: tuple[str, ...]) -> str:
    """The checkpoint's one architecture, if supported; otherwise ImportFailed naming it and the supported ones."""
    names = config.get("architectures") or []
    arch = str(names[0]) if names else f"model_type {config.get('model_type')!r} without architectures"
    if arch not in supported:
        raise ImportFailed(path, f"architecture {arch} is not supported; supported: {', '.join(supported)}")
    return arch


def weights_file(folder: Path) -> Path:
    """The checkpoint's weights file, its safetensors header checked (a truncated file fails here, named)."""
    for name in _WEIGHTS:
        path = folder / name
        if path.is_file():
            break
    else:
        raise ImportFailed(folder, f"no weights: expected {' or '.join(_WEIGHTS)}")
    if path.suffix == ".safetensors":
        check_safetensors(path)
    return path


def check_safetensors(path: Path) -> None:
    """The header parses and every tensor lies inside the file (safetensors' own checks, read lazily)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                f.get_slice(key)
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise ImportFailed(path, f"unreadable safetensors ({e})") from e


def load_tokenizer(folder: Path, vocab_size: int, lowercase_default: bool = True) -> Any:
    """tokenizer.json (or vocab.txt + tokenizer_config.json's do_lower_case), with its fixed truncation and padding
    taken off (the server pads and checks lengths itself); its size must be the model's vocabulary size."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise ImportFailed(path, f"unreadable tokenizer ({e})") from e
    elif (folder / "vocab.txt").is_file():
        from tokenizers import BertWordPieceTokenizer

        path = folder / "vocab.txt"
        cfg = read_json_file(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        tok = BertWordPieceTokenizer(str(path), lowercase=bool(cfg.get("do_lower_case", lowercase_default)))
    else:
        raise ImportFailed(folder, "no tokenizer: expected tokenizer.json or vocab.txt")
    tok.no_truncation()
    tok.no_padding()
    if tok.get_vocab_size() != vocab_size:
        raise ImportFailed(path, f"the tokenizer has {tok.get_vocab_size()} tokens but config.json's vocab_size "
                                 f"is {vocab_size}")
    return tok


def embedding_defaults(folder: Path) -> dict[str, Any] | None:
    """Embed's defaults from a sentence-transformers folder (None for a plain transformers folder)."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return None
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ImportFailed(modules_path, f"not valid JSON ({e})") from e
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unknown or "Pooling" not in kinds or not isinstance(modules, list):
        raise ImportFailed(modules_path, f"modules {unknown or 'without Pooling'} are not supported; supported: "
                                         "Transformer, Pooling (mean or cls), Normalize")
    pooling_path = folder / str(kinds["Pooling"].get("path", "1_Pooling")) / "config.json"
    pool = read_json_file(pooling_path)
    modes = sorted(k.removeprefix("pooling_mode_") for k, v in pool.items() if k.startswith("pooling_mode_") and v)
    if modes not in (["mean_tokens"], ["cls_token"]):
        raise ImportFailed(pooling_path, f"pooling {modes} is not supported; supported: mean_tokens or cls_token")
    st_config = folder / "sentence_bert_config.json"
    max_seq = read_json_file(st_config).get("max_seq_length") if st_config.is_file() else None
    return {"pooling": "mean" if modes == ["mean_tokens"] else "cls", "specials": True,
            "normalize": "Normalize" in kinds, "truncate": True,
            "max_seq_length": int(max_seq) if max_seq else None, "source": "sentence-transformers"}


def load_model(folder: Path, arch: str, weights: Path, buffers: tuple[str, ...] = ("position_ids",)) -> Any:
    """The transformers model `arch` in eval mode (eager attention: it traces to plain ONNX ops); a weight the
    config expects but the file lacks (other than the `buffers`), or a shape that differs, fails the import."""
    import transformers

    cls = getattr(transformers, arch)
    with quiet_transformers():
        try:
            model, info = cls.from_pretrained(str(folder), attn_implementation="eager", output_loading_info=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise ImportFailed(weights, f"does not match config.json ({str(e).splitlines()[0][:300]})") from e
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith(buffers)]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        what = f"lacks {len(missing)} weights config.json needs ({', '.join(sorted(missing)[:3])}...)" if missing \
            else f"has weights of other shapes than config.json says ({mismatched[:2]})"
        raise ImportFailed(weights, what)
    return model.eval()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports on stderr (the import's own error is the one line there)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def serving_graph(model: Any, arch: str) -> Any:
    """The `bert` contract around a transformers model: (ids, mask, types, blanks) -> the outputs its heads give."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class HfBertServingGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.encoder = model if arch == "BertModel" else model.bert
            self.mlm = model.cls.predictions if arch in _MLM else None
            self.nsp = model.cls.seq_relationship if arch == "BertForPreTraining" else None

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                    mask_positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            hidden = out.last_hidden_state  # (B, T, C)
            outputs = []
            if self.mlm is not None:
                index = mask_positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # (B, M, C)
                outputs.append(F.log_softmax(self.mlm(hidden.gather(1, index)), dim=-1))  # (B, M, V)
            if self.nsp is not None:
                outputs.append(F.log_softmax(self.nsp(out.pooler_output), dim=-1))  # (B, 2), 0 = IsNext
            if self.mlm is None:  # keep the contract's input in the graph (the exporter drops unused inputs)
                hidden = hidden + (mask_positions.sum() * 0).to(hidden.dtype)
            return (*outputs, hidden)

    return HfBertServingGraph().eval()


def output_names(arch: str) -> tuple[str, ...]:
    return (*(("mask_logprobs",) if arch in _MLM else ()), *(("nsp_logprobs",) if arch == "BertForPreTraining" else ()),
            "hidden_states")


def export_graph(graph: Any, arch: str, vocab_size: int, hidden: int, window: int, path: Path) -> dict[str, Any]:
    """Export and check parity with the torch model on padded batches of several shapes (fails the import)."""
    import torch
    from plm.export.bert_export import graph_parity, random_batch
    from plm.export.parity import PARITY_TOLERANCE, export_module

    names = output_names(arch)
    seq = {0: "batch", 1: "sequence"}
    axes = {"input_ids": seq, "attention_mask": seq, "token_type_ids": seq,
            "mask_positions": {0: "batch", 1: "masks"}, "mask_logprobs": {0: "batch", 1: "masks"},
            "nsp_logprobs": {0: "batch"}, "hidden_states": seq}
    dummy = random_batch(vocab_size, 2, 8, 2, torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        # transformers' mask helper compares a traced shape with itself (always 0 padding); the blank gather's
        # indices are never negative. Parity below checks the graph on other shapes.
        warnings.filterwarnings("ignore", module="transformers.masking_utils")
        warnings.filterwarnings("ignore", message=".*aten::index.*", category=UserWarning)
        export_module(graph, dummy, path, INPUT_NAMES, names,
                      {k: v for k, v in axes.items() if k in INPUT_NAMES or k in names}, 17)
    parity = graph_parity(graph, path, vocab_size, window, names, seed=1)
    worst = float(parity["max_abs_diff"])
    if not worst <= PARITY_TOLERANCE:
        raise ImportFailed(path.name, f"ONNX and transformers differ by {worst:.3g} > {PARITY_TOLERANCE:g}")
    shapes = {"mask_logprobs": ["batch", "masks", vocab_size], "nsp_logprobs": ["batch", 2],
              "hidden_states": ["batch", "sequence", hidden]}
    return {
        "file": path.name, "opset": 17,
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "masks" if n == "mask_positions" else "sequence"]}
                   for n in INPUT_NAMES],
        "outputs": [{"name": n, "dtype": "float32", "shape": shapes[n]} for n in names],
        "parity": parity,
        "onnx_checker": "passed",
    }


def sentence_transformers_reference(folder: Path) -> Reference | None:
    """`SentenceTransformer(folder).encode` of VARIANT_TEXTS, what an imported folder's variants are compared
    with; None where sentence-transformers is not installed (an optional dependency)."""
    try:
        import sentence_transformers
    except ImportError:
        return None
    from plm.export.variants import Reference

    with quiet_transformers():
        model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
        vectors = model.encode(list(VARIANT_TEXTS), batch_size=32, convert_to_numpy=True)
    return Reference(f"sentence-transformers {sentence_transformers.__version__} encode", np.asarray(vectors))


def import_bert(source: Path, repository: Path, name: str, max_length: int | None, replace: bool,
                variants: Sequence[str] = ()) -> dict[str, Any]:
    """Import the checkpoint folder `source` as `repository/name` with its `variants`; returns the manifest."""
    import torch
    import transformers

    config_path = source / "config.json"
    config = read_json_file(config_path)
    arch = read_architecture(config, config_path, ARCHITECTURES)
    weights = weights_file(source)
    defaults = embedding_defaults(source)
    tok = load_tokenizer(source, int(config.get("vocab_size", 0)))
    specials = {}
    for role, token in _SPECIALS.items():
        if tok.token_to_id(token) is None:
            raise ImportFailed(source / "tokenizer.json", f"has no {token} token (the bert family needs "
                                                          f"{', '.join(_SPECIALS.values())})")
        specials[role] = token
    windows = [int(config.get("max_position_embeddings", 512)), max_length,
               defaults.get("max_seq_length") if defaults else None]
    window = min(w for w in windows if w)
    torch.manual_seed(0)
    model = load_model(source, arch, weights)
    tasks = ["embed", *(["fill_mask", "score"] if arch in _MLM else []),
             *(["next_sentence"] if arch == "BertForPreTraining" else [])]
    vocab, hidden = int(model.config.vocab_size), int(model.config.hidden_size)
    with model_folder(repository, name, replace) as folder:
        graph = export_graph(serving_graph(model, arch), arch, vocab, hidden, window, folder / "model.onnx")
        tok.save(str(folder / "tokenizer.json"))
        n_params = sum(int(np.prod(p.shape)) for p in model.parameters())
        reference = f"transformers {transformers.__version__} {arch} (PyTorch, eager attention)"
        manifest: dict[str, Any] = {
            "name": name, "family": "bert", "tasks": tasks,
            "description": f"imported {arch} {model.config.num_hidden_layers} layers × {hidden}, "
                           f"{n_params:,} parameters",
            "max_length": window, "vocab_size": vocab,
            "tokenizer": {"file": "tokenizer.json", "kind": "wordpiece", **specials},
            "graphs": {"model": graph},
            "parity": graph["parity"], "parity_max_abs_diff": graph["parity"]["max_abs_diff"],
            "parity_reference": reference,
            "config": config,
            "source": source_identity(
                [config_path, weights, *(source / f for f in ("tokenizer.json", "vocab.txt", "modules.json"))],
                format="sentence-transformers" if defaults else "transformers", architecture=arch,
                path=str(source.resolve()), license=card_license(source)),
        }
        if defaults:
            manifest["embedding"] = {k: v for k, v in defaults.items() if k != "max_seq_length"}
        vectors = sentence_transformers_reference(source) if defaults and variants else None
        return finish(folder, manifest, variants, vectors)


def card_license(folder: Path) -> str | None:
    """The `license:` of the model card's front matter (README.md), if it has one."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None
