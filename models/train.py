"""The training loop every neural family shares, and the batch sampler for language models.

`train()` owns the optimisation schedule and its stopping rules; a family brings only its model and a
`get_batch(split)` function. Conventions:

- a batch is a tuple `(*inputs, targets)`; the default loss is `model(*inputs, targets=targets)[1]`, the
  nanoGPT convention of returning `(logits, loss)`. A family that does not fit passes its own
  `loss_fn(model, batch) -> scalar loss`.
- AdamW (nanoGPT's betas) with weight decay on 2-D weights (matmuls, embeddings) only, never on biases
  and LayerNorm gains; linear warm-up, then cosine decay to `min_lr`; gradient-norm clipping.
- every `eval_interval` steps the mean loss over `eval_batches` validation batches is taken; training
  stops at `max_steps` or after `patience` evaluations without a better validation loss. Both depend only
  on the seed, so one commit and seed give the same weights on one machine, however fast it is. The
  model ends with the weights of its best validation loss, in eval mode.
- `max_seconds` is a safety cap, not the plan: the schedule is laid out over `max_steps` alone, and a run
  the clock cuts short logs a warning and records `time_budget` (the manifest shows steps done vs
  planned), since its weights then depend on the machine's speed.
- progress is a tqdm bar (loss, lr, last validation loss) on a terminal; elsewhere (`make serve > build.log`,
  a pipe, CI) it is a plain log line at each tenth of the run, since a bar redrawn every step would fill the
  log with carriage-return frames. The end is one summary line and a loss-curve PNG in `out_dir`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from tqdm import tqdm

Batch = tuple[Tensor, ...]  # (*inputs, targets)
GetBatch = Callable[[str], Batch]  # "train" | "valid" -> one batch
LossFn = Callable[[nn.Module, Batch], Tensor]  # -> scalar mean loss
StopReason = Literal["max_steps", "early_stopping", "time_budget"]

log = logging.getLogger("plm.train")
_PLAIN_LINES = 10  # off a terminal: a progress line at each tenth of the run (of its steps or of its time budget)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 2000  # the planned length of the run: the schedule decays over it
    batch_size: int = 32  # read by the family's get_batch, not by train(); recorded for the manifest
    lr: float = 1e-3  # peak learning rate; small Transformers tolerate 1e-3 (nanoGPT's shakespeare_char)
    min_lr: float = 1e-4  # lr / 10 at the end of the cosine, as the Chinchilla paper recommends
    warmup_steps: int = 100  # Adam's second-moment estimates are noise for the first ~100 steps
    weight_decay: float = 0.1  # GPT-2/3 value; applied to 2-D weights only
    grad_clip: float = 1.0  # clip the global gradient norm; 0 disables
    eval_interval: int = 100  # steps between validation runs (each costs eval_batches forward passes)
    eval_batches: int = 10  # batches per validation estimate: enough to see trends, cheap on CPU
    patience: int | None = 5  # evaluations without a new best before stopping; None disables
    max_seconds: float | None = None  # safety cap on the loop's wall clock (warns when it cuts); None: no cap
    seed: int = 1337  # seeds torch (init, dropout); the batch sampler has its own generator
    num_threads: int = 2  # torch intra-op threads: the build machine has few cores and shares them
    progress: bool = True  # a tqdm bar on a terminal, a line per tenth of the run elsewhere; False: neither
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when torch sees a GPU); see resolve_device


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimiser steps taken
    planned_steps: int  # cfg.max_steps: fewer steps were taken after early stopping or the time cap
    best_valid_loss: float  # the loss of the weights the model ends with
    final_train_loss: float  # mean training loss over the last evaluation interval
    seconds: float
    tokens_seen: int  # training targets that counted in the loss (targets != -100)
    stopped_because: StopReason
    history: tuple[tuple[int, float, float], ...]  # (step, train_loss, valid_loss) at each evaluation
    device: str = "cpu"  # where it trained (a GPU run is not bit-for-bit the CPU run of the same seed)

    def manifest(self, parameters: int, **extra: Any) -> dict[str, Any]:
        """The `training` section of a model manifest (GetModel shows its numbers as figures)."""
        return {"steps": self.steps, "planned_steps": self.planned_steps, "best_valid_loss": self.best_valid_loss,
                "final_train_loss": self.final_train_loss, "seconds": round(self.seconds, 1),
                "tokens_seen": self.tokens_seen, "stopped_because": self.stopped_because,
                "device": self.device, "parameters": parameters, **extra}

    def summary(self) -> str:
        rate = self.tokens_seen / self.seconds if self.seconds > 0 else float("nan")
        return (
            f"trained {self.steps}/{self.planned_steps} steps in {self.seconds:.1f} s ({self.stopped_because}), "
            f"{self.tokens_seen:,} tokens ({rate:,.0f} tokens/s); final train loss "
            f"{self.final_train_loss:.4f}, best valid loss {self.best_valid_loss:.4f} "
            f"(ppl {math.exp(min(self.best_valid_loss, 50.0)):.1f})"
        )


class _Progress:
    """How far training is: tqdm's bar when stderr is a terminal, else a plain log line at each tenth."""

    def __init__(self, desc: str, total: int, unit: str, enabled: bool) -> None:
        self.desc, self.total, self.unit = desc, max(1, total), unit
        terminal = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) if terminal else None
        self.plain = enabled and not terminal
        self.next_line = 1  # the next tenth (of _PLAIN_LINES) that earns a plain line

    def update(self, done: int, **postfix: str) -> None:
        """`done` steps (or seconds of the budget) so far; `postfix` the figures each report shows."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(postfix)
        elif self.plain and done * _PLAIN_LINES >= self.next_line * self.total:
            self.next_line = done * _PLAIN_LINES // self.total + 1
            log.info("%s: %d/%d %s (%d%%) %s", self.desc, done, self.total, self.unit, 100 * done // self.total,
                     " ".join(f"{k} {v}" for k, v in postfix.items() if k != self.unit))  # not `step` twice

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    """`batch = (*inputs, targets)`; the model returns `(logits, loss)` given `targets=`."""
    *inputs, targets = batch
    _, loss = model(*inputs, targets=targets)
    return loss


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps (nanoGPT's get_lr).

    A function of the step alone (never of the clock), so the schedule, and with it the weights, are the
    same on a fast and a slow machine.
    """
    progress = max(0, step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)
    if step < cfg.warmup_steps:  # the lower of the ramp and the cosine: no jump when a slow warm-up ends
        return min(cfg.lr * (step + 1) / (cfg.warmup_steps + 1), cosine)
    return cosine


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decoupled weight decay on tensors of 2 or more dims; biases and norms are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _count_targets(batch: Batch) -> int:
    targets = batch[-1]
    if targets.dtype.is_floating_point:
        return int(targets.shape[0])
    return int((targets != -100).sum())


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; a named CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU here (use cpu or auto)")
    return device


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The batch on `device` (the samplers build it on the CPU); a no-op on the CPU."""
    if device.type == "cpu":
        return batch
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def estimate_loss(model: nn.Module, get_batch: GetBatch, split: str, batches: int, loss_fn: LossFn,
                  device: torch.device | None = None) -> float:
    """Mean loss over `batches` batches of `split`, in eval mode (no dropout); restores train mode."""
    was_training = model.training
    model.eval()
    on = device or torch.device("cpu")
    losses = [float(loss_fn(model, to_device(get_batch(split), on))) for _ in range(batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    model: nn.Module,
    get_batch: GetBatch,
    cfg: TrainConfig,
    out_dir: Path,
    *,
    loss_fn: LossFn = default_loss_fn,
    desc: str = "train",
) -> TrainResult:
    """Train `model` in place and return what happened; writes `out_dir/loss_curve.png`.

    Evaluates at step 0, every `cfg.eval_interval` steps, and once more when the loop stops (unless it
    just did). The wall-clock cap is checked before every step, so the loop overshoots `max_seconds` by
    at most one step plus one evaluation; a run it cuts short logs a warning.
    """
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)  # before the optimiser, so its state lives beside the weights
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, cfg)

    history: list[tuple[int, float, float]] = []
    best_loss = math.inf
    best_state: dict[str, Tensor] | None = None
    evals_without_improvement = 0
    tokens_seen = 0
    interval_losses: list[float] = []  # training losses since the last evaluation
    stopped_because: StopReason = "max_steps"
    step = 0

    def evaluate(step: int) -> bool:
        """Record (step, train, valid); keep the best weights; return True when patience has run out."""
        nonlocal best_loss, best_state, evals_without_improvement
        valid_loss = estimate_loss(model, get_batch, "valid", cfg.eval_batches, loss_fn, device)
        if interval_losses:
            train_loss = sum(interval_losses) / len(interval_losses)
        else:  # step 0: nothing trained yet, so estimate it the same way as the validation loss
            train_loss = estimate_loss(model, get_batch, "train", cfg.eval_batches, loss_fn, device)
        interval_losses.clear()
        history.append((step, train_loss, valid_loss))
        if valid_loss < best_loss:
            best_loss = valid_loss
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            evals_without_improvement = 0
        else:
            evals_without_improvement += 1
        return cfg.patience is not None and evals_without_improvement >= cfg.patience

    t0 = time.monotonic()
    model.train()
    evaluate(0)
    bar = _Progress(desc, cfg.max_steps, "step", cfg.progress)
    last_eval_step = 0
    while True:
        if step >= cfg.max_steps:
            stopped_because = "max_steps"
            break
        if cfg.max_seconds is not None and time.monotonic() - t0 >= cfg.max_seconds:
            stopped_because = "time_budget"
            log.warning("%s: the %.0f s time cap stopped training at step %d of %d planned; the weights now "
                        "depend on this machine's speed (raise max_seconds or lower max_steps)", desc,
                        cfg.max_seconds, step, cfg.max_steps)
            break
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = to_device(get_batch("train"), device)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        tokens_seen += _count_targets(batch)
        interval_losses.append(loss.item())
        bar.update(step, step=str(step),
                   loss=f"{interval_losses[-1]:.4f}", lr=f"{lr:.2e}", valid=f"{history[-1][2]:.4f}")
        if step % cfg.eval_interval == 0:
            last_eval_step = step
            if evaluate(step):
                stopped_because = "early_stopping"
                break
    if last_eval_step != step:
        evaluate(step)
    bar.close()
    seconds = time.monotonic() - t0

    model.to("cpu")  # export and evaluation run on the CPU, as the server does
    if best_state is not None:  # end on the best validation weights, whatever stopped the loop
        model.load_state_dict(best_state)
    model.eval()
    result = TrainResult(
        steps=step,
        planned_steps=cfg.max_steps,
        best_valid_loss=best_loss,
        final_train_loss=history[-1][1],
        seconds=seconds,
        tokens_seen=tokens_seen,
        stopped_because=stopped_because,
        history=tuple(history),
        device=str(device),
    )
    plot_loss_curve(result, out_dir / "loss_curve.png", title=desc)
    print(f"{desc}: {result.summary()}")
    return result


def plot_loss_curve(result: TrainResult, path: Path, title: str = "train") -> None:
    """Train and validation loss against step, as a PNG (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [s for s, _, _ in result.history]
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, [t for _, t, _ in result.history], marker=".", label="train")
    ax.plot(steps, [v for _, _, v in result.history], marker=".", label="valid")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    best = f"best valid {result.best_valid_loss:.3f}"
    ax.set_title(f"{title}: {result.steps}/{result.planned_steps} steps, {best} ({result.stopped_because})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def pad_right(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[Tensor, Tensor]:
    """Token rows of unequal length as right-padded (B, T) int64 ids and attention mask (1 = real token)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def lm_batches(
    token_ids: np.ndarray | Mapping[str, np.ndarray],
    block_size: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    valid_fraction: float = 0.1,
) -> GetBatch:
    """Random windows of a 1-D token stream as `(x, y)` int64 (B, block_size) batches, y = x shifted by one.

    `token_ids` is either one stream, split into train (head) and valid (the last `valid_fraction`), or a
    mapping {"train": stream, "valid": stream}. Each split draws from its own generator spawned from `rng`,
    so the batches are reproducible given the seed and the valid draws do not shift the train draws.
    """
    if isinstance(token_ids, Mapping):
        streams = {split: np.asarray(token_ids[split]) for split in ("train", "valid")}
    else:
        stream = np.asarray(token_ids)
        cut = int(len(stream) * (1.0 - valid_fraction))
        streams = {"train": stream[:cut], "valid": stream[cut:]}
    for split, s in streams.items():
        if s.ndim != 1 or len(s) < block_size + 1:
            raise ValueError(f"{split} stream: {len(s)} tokens, a window needs {block_size + 1}")
    rngs = dict(zip(("train", "valid"), rng.spawn(2), strict=True))
    offsets = np.arange(block_size + 1)

    def get_batch(split: str) -> Batch:
        s = streams[split]
        starts = rngs[split].integers(0, len(s) - block_size, size=batch_size)  # windows of block_size + 1
        window = torch.from_numpy(s[starts[:, None] + offsets].astype(np.int64))  # (B, block_size + 1)
        return window[:, :-1], window[:, 1:]  # x, y: (B, block_size) each

    return get_batch
