"""`plm import gpt2`: a Hugging Face GPT2LMHeadModel folder into a `gpt` family model folder (service/families/gpt.py).

The weights load into our own GPT (models/gpt.py: the same architecture, with GPT-2's tanh-approximate GELU as
its `activation`), the reverse of export/hf_gpt2.py: Conv1D weights transposed, the LM head tied to the token
embedding. The existing exporter then writes the scoring graph, the KV-cache decoder and the KV layout graph
(export/onnx_export.py, each checked against our module), and the scoring graph is checked once more against
transformers' own GPT2LMHeadModel on padded batches: that difference is the manifest's parity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from plm.export.importers.common import ImportFailed, finish, model_folder, read_json_file, source_identity
from plm.export.importers.hf_bert import card_license, load_model, read_architecture, weights_file

ARCHITECTURES = ("GPT2LMHeadModel",)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ENDOFTEXT = "<|endoftext|>"
PARITY_SHAPES = ((1, 5), (3, 11), (4, 17))  # (batch, length), right- and left-padded


def check_config(config: dict[str, Any], path: Path) -> None:
    """Refuse the GPT-2 options our GPT does not have (each would change the numbers)."""
    unsupported = {
        "activation_function": config.get("activation_function", "gelu_new") not in _ACTIVATIONS,
        "layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-5)) != 1e-5,
        "n_inner": config.get("n_inner") not in (None, 4 * int(config.get("n_embd", 768))),
        "scale_attn_by_inverse_layer_idx": bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        "scale_attn_weights": not config.get("scale_attn_weights", True),
        "tie_word_embeddings": not config.get("tie_word_embeddings", True),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ImportFailed(path, f"{', '.join(f'{k}={config.get(k)!r}' for k in bad)} not supported by the gpt "
                                 "family (GPT-2's defaults are)")


def load_tokenizer(folder: Path, vocab_size: int) -> Any:
    """tokenizer.json (or vocab.json + merges.txt) as byte-level BPE, fixed truncation/padding off, with
    <|endoftext|> and exactly the model's vocabulary size."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        if path.is_file():
            tok = Tokenizer.from_file(str(path))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from tokenizers import ByteLevelBPETokenizer

            path = folder / "vocab.json"
            tok = ByteLevelBPETokenizer(str(path), str(folder / "merges.txt"))
            tok.add_special_tokens([ENDOFTEXT])
        else:
            raise ImportFailed(folder, "no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
    except ImportFailed:
        raise
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise ImportFailed(path, f"unreadable tokenizer ({e})") from e
    tok.no_truncation()
    tok.no_padding()
    if tok.get_vocab_size() != vocab_size:
        raise ImportFailed(path, f"the tokenizer has {tok.get_vocab_size()} tokens but config.json's vocab_size "
                                 f"is {vocab_size}")
    if tok.token_to_id(ENDOFTEXT) is None:
        raise ImportFailed(path, f"has no {ENDOFTEXT} token (the gpt family's BOS and EOS)")
    return tok


def to_our_gpt(hf: Any, window: int, activation: str) -> Any:
    """Our GPT with the weights of a GPT2LMHeadModel (the reverse of export/hf_gpt2.to_hf_gpt2)."""
    from plm.models.gpt import GPT, GPTConfig

    c = hf.config
    config = GPTConfig(vocab_size=c.vocab_size, block_size=window, n_layer=c.n_layer, n_head=c.n_head,
                       n_embd=c.n_embd, dropout=0.0, bias=True, activation=activation)
    model = GPT(config)
    state = {}
    for key, value in hf.state_dict().items():
        if not key.startswith("transformer.") or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # lm_head is tied to wte; the causal-mask buffers of old checkpoints are not weights
        ours = key.removeprefix("transformer.")
        value = value.t().contiguous() if ours.endswith(_CONV1D) else value
        state[ours] = value[:window] if ours == "wpe.weight" else value  # a shorter window keeps the first positions
    state["lm_head.weight"] = state["wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ImportFailed("weights", f"GPT-2 to gpt mapping incomplete: missing {missing}, unexpected {unexpected}")
    return model.eval()


def transformers_parity(hf: Any, path: Path, window: int) -> dict[str, Any]:
    """max |ONNX − transformers| of token_logprobs and next_logprobs on random right- and left-padded batches."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from plm.export.onnx_export import _random_batch
    from plm.export.parity import PARITY_TOLERANCE

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    worst, checked = 0.0, []
    for batch, length in PARITY_SHAPES:
        length = min(length, window)
        for padding in ("right", "left"):
            ids, mask, positions = _random_batch(hf.config.vocab_size, batch, length, padding, generator)
            with torch.no_grad():
                logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            lp = torch.log_softmax(logits.double(), dim=-1).numpy()  # (B, T, V)
            tokens, nxt = session.run(["token_logprobs", "next_logprobs"], {
                "input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()})
            m = mask.numpy() > 0
            for b in range(batch):
                cols = np.flatnonzero(m[b])
                expected = lp[b, cols[:-1], ids.numpy()[b, cols[1:]]]
                worst = max(worst, float(np.abs(tokens[b, cols[1:]] - expected).max(initial=0.0)),
                            float(np.abs(nxt[b] - lp[b, cols[-1]]).max()))
            checked.append([batch, length, padding])
    if not worst <= PARITY_TOLERANCE:
        raise ImportFailed(path.name, f"ONNX and transformers differ by {worst:.3g} > {PARITY_TOLERANCE:g}")
    return {"max_abs_diff": worst, "tolerance": PARITY_TOLERANCE, "checked_shapes": checked}


def import_gpt2(source: Path, repository: Path, name: str, max_length: int | None, replace: bool,
                variants: Sequence[str] = ()) -> dict[str, Any]:
    """Import the GPT2LMHeadModel folder `source` as `repository/name` with its `variants`; returns the manifest."""
    import transformers
    from plm.export.onnx_export import export_gpt, export_gpt_decoder, export_kv_layout

    config_path = source / "config.json"
    config = read_json_file(config_path)
    read_architecture(config, config_path, ARCHITECTURES)
    check_config(config, config_path)
    weights = weights_file(source)
    tok = load_tokenizer(source, int(config.get("vocab_size", 0)))
    window = min(w for w in (int(config.get("n_positions", 1024)), max_length) if w)
    # lm_head is tied to wte; old checkpoints hold no causal-mask buffers (attn.bias, attn.masked_bias)
    hf = load_model(source, "GPT2LMHeadModel", weights, buffers=(".attn.bias", ".attn.masked_bias", "lm_head.weight"))
    activation = _ACTIVATIONS[config.get("activation_function", "gelu_new")]
    model = to_our_gpt(hf, window, activation)
    cfg = model.config
    with model_folder(repository, name, replace) as folder:
        try:
            graph = export_gpt(model, folder / "model.onnx")
            decoder = export_gpt_decoder(model, folder / "decoder.onnx")
        except RuntimeError as e:  # the exporter's own parity (ONNX vs our module)
            raise ImportFailed(source, str(e)) from e
        reference = transformers_parity(hf, folder / "model.onnx", window)
        tok.save(str(folder / "tokenizer.json"))
        worst = max(reference["max_abs_diff"], graph["parity"]["max_abs_diff"], decoder["parity"]["max_abs_diff"])
        return finish(folder, {
            "name": name, "family": "gpt", "tasks": ["score", "predict_next", "generate", "embed"],
            "description": f"imported GPT2LMHeadModel {cfg.n_layer} layers × {cfg.n_embd}, "
                           f"{model.num_params():,} parameters",
            "max_length": window, "vocab_size": cfg.vocab_size,
            "tokenizer": {"file": "tokenizer.json", "kind": "bpe", "bos": ENDOFTEXT, "eos": ENDOFTEXT,
                          "pad": ENDOFTEXT},
            "graphs": {"model": graph, "decoder": decoder,
                       "kv_layout": export_kv_layout(folder / "kv_layout.onnx", 2 * cfg.n_layer)},
            "parity": {**reference, "max_abs_diff": worst},
            "parity_max_abs_diff": worst,
            "parity_reference": f"transformers {transformers.__version__} GPT2LMHeadModel (PyTorch, eager "
                                "attention); the decoder against our GPT module",
            "config": asdict(cfg),
            "source": source_identity(
                [config_path, weights, *(source / f for f in ("tokenizer.json", "vocab.json", "merges.txt"))],
                format="transformers", architecture="GPT2LMHeadModel", path=str(source.resolve()),
                license=card_license(source)),
        }, variants)
