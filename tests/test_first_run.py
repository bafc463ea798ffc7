"""What a new user meets in the first ten minutes: a build log without progress-bar frames, client output
without escape bytes when piped, one default per option in every `--help`, and one line (exit 1) when a port
is taken. (The metrics page without `_created` series: tests/test_prometheus.py.)
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch import Tensor

from plm.cli import _build_parser
from plm.cli import main as cli_main
from tests.conftest import ServerThread, make_config

PLM = [sys.executable, "-m", "plm.cli"]


# ------------------------------------------------------------------------------ progress off a terminal


class _Bigram(nn.Module):
    """The smallest language model train() accepts: a logits table indexed by the previous token."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.table(x)  # (B, T, V)
        return logits, nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_training_progress_off_a_terminal_is_a_few_plain_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """Under pytest stderr is no terminal, as in `make serve > build.log`: a line per tenth of the run and the
    summary, instead of a tqdm frame (with carriage return and postfix) per step."""
    from plm.models.train import TrainConfig, train

    gen = torch.Generator().manual_seed(0)

    def get_batch(split: str) -> tuple[Tensor, Tensor]:
        x = torch.randint(0, 16, (4, 8), generator=gen)
        return x, (x + 1) % 16

    steps = 400
    cfg = TrainConfig(max_steps=steps, warmup_steps=10, eval_interval=100, eval_batches=1, patience=None,
                      num_threads=1, progress=True)
    with caplog.at_level(logging.INFO, logger="plm.train"):
        result = train(_Bigram(16), get_batch, cfg, tmp_path, desc="bigram")
    out, err = capfd.readouterr()
    assert result.steps == steps
    lines = [r.getMessage() for r in caplog.records if r.name == "plm.train"]
    assert 5 <= len(lines) <= 10 and lines[-1].startswith(f"bigram: {steps}/{steps} step (100%)"), lines
    assert all("\n" not in line and "\r" not in line for line in lines)
    assert "\r" not in err and "it/s" not in err and "step/s" not in err  # no tqdm frame reached the log
    assert out.splitlines() == [f"bigram: {result.summary()}"]  # the summary line stays
    log_bytes = len(out) + len(err) + sum(len(line) + 40 for line in lines)  # 40: the formatter's timestamp etc.
    assert log_bytes < 2048, log_bytes


# ------------------------------------------------------------------------------ client output


@pytest.fixture(scope="module")
def gpt_server(tiny_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(tiny_repo, models=("gpt",)))
    yield srv
    srv.stop()


def _generate(target: str, *extra: str) -> list[str]:
    return ["client", "--target", target, *extra, "generate", "gpt", "ROMEO:", "-n", "4", "-t", "0"]


def test_piped_client_output_has_no_escape_bytes(gpt_server: ServerThread) -> None:
    """`plm client generate ... | cat`: stdout is a pipe, so the generated text is not bold."""
    for extra in ((), ("--json",)):
        proc = subprocess.run([*PLM, *_generate(gpt_server.target, *extra)], capture_output=True, text=True,
                              timeout=60, check=True)
        assert "ROMEO:" in proc.stdout and "\x1b" not in proc.stdout, proc.stdout


def test_bold_only_on_a_terminal_without_no_color(gpt_server: ServerThread, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli_main(_generate(gpt_server.target)) == 0
    assert "\x1b[1m" in capsys.readouterr().out  # a terminal: the generated text stands out
    assert cli_main(_generate(gpt_server.target, "--json")) == 0
    assert "\x1b" not in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    assert cli_main(_generate(gpt_server.target)) == 0
    assert "\x1b" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ --help


def _helps(parser: argparse.ArgumentParser, name: str = "plm") -> Iterator[tuple[str, str]]:
    """(command, its --help text) for `plm` and every verb under it, at any depth."""
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from _helps(sub, f"{name} {verb}")


def test_every_help_gives_each_default_once() -> None:
    helps = dict(_helps(_build_parser()))
    assert {"plm build", "plm serve", "plm loadtest", "plm client", "plm client generate"} <= set(helps)
    for command, text in helps.items():
        assert "(default:" not in text and "None" not in text, f"{command} --help:\n{text}"
    serve = " ".join(helps["plm serve"].split())  # unwrapped
    assert "gRPC port [50051]" in serve and "0 = off [9090]" in serve
    generate = " ".join(helps["plm client generate"].split())
    assert "tokens to generate at most [32]" in generate
    assert "--force rebuild models even when an up-to-date build exists --seed" in " ".join(
        helps["plm build"].split())  # a flag that is off says nothing


def test_real_serve_help_has_no_none() -> None:
    out = subprocess.run([*PLM, "serve", "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "[50051]" in out and "None" not in out


# ------------------------------------------------------------------------------ a port already in use


@pytest.fixture()
def taken_port() -> Iterator[int]:
    """A loopback port another program listens on (without SO_REUSEPORT: nobody else may bind it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(("flags", "says"), [
    (("--port", "{taken}", "--metrics-port", "0"), "127.0.0.1:{taken} is already in use"),
    (("--port", "0", "--metrics-port", "{taken}"), "metrics address 127.0.0.1:{taken} is already in use"),
    (("--port", "{taken}", "--metrics-port", "0", "--workers", "2"), "127.0.0.1:{taken} is already in use"),
], ids=["grpc", "metrics", "workers"])
def test_a_taken_port_is_one_line_and_exit_1(tiny_repo: Path, taken_port: int, flags: tuple[str, ...],
                                             says: str) -> None:
    args = [f.format(taken=taken_port) for f in flags]
    proc = subprocess.run([*PLM, "serve", "--repository", str(tiny_repo), "--models", "ngram-kn", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert says.format(taken=taken_port) in proc.stderr and "another server" in proc.stderr
    assert ("--metrics-port" if "metrics" in says else "--port") in proc.stderr


def test_a_port_taken_after_the_check_is_one_line_too(tiny_repo: Path, taken_port: int) -> None:
    """Another program binds between the check and gRPC's bind: gRPC's error becomes the same line."""
    script = ("import sys, plm.cli\n"
              "plm.cli._taken_port = lambda config: None  # as if the port were taken just after the check\n"
              f"sys.exit(plm.cli.main(['serve', '--repository', {str(tiny_repo)!r}, '--models', 'ngram-kn', "
              f"'--port', '{taken_port}', '--metrics-port', '0']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"plm serve: 127.0.0.1:{taken_port} is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_worker_that_finds_its_port_taken_stops_the_supervisor_at_once(tiny_repo: Path, taken_port: int) -> None:
    """The supervisor started (the port was free when `plm serve` checked it); its workers then find it taken:
    each says so in one line and exits PORT_TAKEN, and the supervisor stops with exit 1 without restarting."""
    script = (
        "import sys; from pathlib import Path\n"
        "from plm.service.config import load_config\n"
        "from plm.service.workers import Supervisor\n"
        f"config = load_config(None, {{'repository': Path({str(tiny_repo)!r}), 'port': {taken_port}, "
        "'metrics_port': 0, 'workers': 2})\n"
        f"sys.exit(Supervisor(config, ['--repository', {str(tiny_repo)!r}, '--port', '{taken_port}', "
        "'--models', 'ngram-kn']).run())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"127.0.0.1:{taken_port} is already in use" in proc.stderr
    assert "restarting" not in proc.stderr and "died" not in proc.stderr
