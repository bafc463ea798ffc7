"""Our GPT as a Hugging Face `transformers` GPT2LMHeadModel: the outside oracle and the benchmark reference.

The architectures are the same (pre-LN, GELU, learned positions, tied embeddings); parameter names follow
GPT2Model's, but GPT-2 stores its projections as Conv1D, whose weights are the transpose of nn.Linear's.
GPT-2's default activation is the tanh approximation of GELU; ours is the exact one, so the config says
`activation_function="gelu"`. `transformers` is imported only when called (it is a test/benchmark
dependency, never the server's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from plm.models.gpt import GPT, GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def save_weights(model: GPT, path: Path) -> None:
    """The state dict as a plain .npz (no pickle), beside the ONNX graphs, for oracles and benchmarks."""
    np.savez(path, **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})


def load_weights(path: Path, config: GPTConfig) -> GPT:
    model = GPT(config)
    with np.load(path, allow_pickle=False) as data:
        model.load_state_dict({k: torch.from_numpy(data[k]) for k in data.files})
    return model.eval()


def to_hf_gpt2(model: GPT) -> Any:
    """A GPT2LMHeadModel with the same weights (logits identical up to float rounding)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new" if c.activation == "gelu_tanh" else "gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))
    state = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied to wte
        state["transformer." + k] = v.t().contiguous() if k.endswith(_CONV1D) else v
    state["lm_head.weight"] = model.state_dict()["wte.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GPT → GPT2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()
