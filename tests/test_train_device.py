"""Where the neural families train (`plm build --device`): the CPU by default, CUDA when asked or `auto`.

The training loop moves the model and every batch to the device and hands the model back on the CPU, where
export and evaluation run; the manifest records the device. Without a GPU here, the CUDA half is skipped.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from plm.models.gpt import GPT, GPTConfig
from plm.models.train import TrainConfig, lm_batches, resolve_device, train

no_cuda = not torch.cuda.is_available()


def _tiny_run(device: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    stream = np.random.default_rng(0).integers(0, 64, size=2000).astype(np.int32)
    cfg = TrainConfig(max_steps=12, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=6, eval_batches=2,
                      seed=0, num_threads=1, progress=False, device=device)
    result = train(model, lm_batches(stream, 16, 4, np.random.default_rng(0)), cfg,
                   tmp_path_factory.mktemp(f"train-{device}"))
    return model, result.manifest(model.num_params())


@pytest.mark.skipif(not no_cuda, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name_and_auto_falls_back_to_the_cpu() -> None:
    with pytest.raises(ValueError, match=r"'cuda'.*no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not no_cuda, reason="checks the refusal on a machine without CUDA")
def test_plm_build_refuses_a_missing_gpu_before_training(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "plm.cli", "build", "--profile", "tiny", "--device", "cuda",
                          "--repository", str(tmp_path / "repo")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "no CUDA GPU" in out.stderr
    assert not (tmp_path / "repo").exists()  # nothing written


def test_auto_on_the_cpu_is_the_cpu_run_and_the_manifest_says_where(tmp_path_factory) -> None:
    cpu_model, cpu_facts = _tiny_run("cpu", tmp_path_factory)
    auto_model, auto_facts = _tiny_run("auto", tmp_path_factory)
    assert cpu_facts["device"] == "cpu"
    assert auto_facts["device"] == ("cuda" if not no_cuda else "cpu")
    if no_cuda:  # the same device: the same weights, bit for bit
        for (name, a), (_, b) in zip(cpu_model.state_dict().items(), auto_model.state_dict().items(), strict=True):
            assert torch.equal(a, b), name


@pytest.mark.skipif(no_cuda, reason="needs a CUDA GPU")
def test_a_cuda_run_learns_and_hands_the_model_back_on_the_cpu(tmp_path_factory) -> None:
    _, cpu_facts = _tiny_run("cpu", tmp_path_factory)
    gpu_model, gpu_facts = _tiny_run("cuda", tmp_path_factory)
    assert gpu_facts["device"].startswith("cuda")
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())
    assert abs(gpu_facts["best_valid_loss"] - cpu_facts["best_valid_loss"]) < 0.05  # same seed, other kernels
