"""The data plane's typed requests and results: what every front end translates its wire format to and from.

A request is a frozen dataclass: the model's name and the task's fields, as the client gave them. `None` means
"not given" (the data plane's validation puts the default in); an empty string or sequence is given and empty.
The field names are the data plane's own: an InvalidArgument names them (`texts`, `max_new_tokens`,
`pairs` at `[0].a`), and each front end renames them to its wire's names through its own table.

Results are the tasks' own result types (service/tasks/*), wrapped in `Served` with the model that served
them; generation adds `Generation`, one prompt's whole output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")

# Neutral names of the choices a request makes (the tasks' own constants).
POOLINGS = ("mean", "cls", "none")
SCORINGS = ("sum", "token_mean", "per_char")


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    model: str
    texts: Sequence[str]
    add_eos: bool | None = None
    per_token: bool | None = None
    sources: Sequence[str] = ()  # an encoder-decoder's: one for every text, or one per text


@dataclass(frozen=True, slots=True)
class PredictNextRequest:
    model: str
    contexts: Sequence[str]
    top_k: int | None = None
    include_tokens: bool = False
    beam_width: int | None = None
    max_word_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Prompts and their sampling, flat: each sampling field is a field of the request."""

    model: str
    prompts: Sequence[str]
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    stop: Sequence[str] = ()
    seed: int | None = None
    truncate_prompt: bool = False


@dataclass(frozen=True, slots=True)
class FillMaskRequest:
    model: str
    texts: Sequence[str]
    top_k: int | None = None
    targets: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    model: str
    texts: Sequence[str]
    pooling: str | None = None  # one of POOLINGS; None: the model's default (service/tasks/embed.py)
    normalize: bool = False
    layer_weights: Sequence[float] = ()
    nearest_k: int | None = None
    analogies: Sequence[tuple[str, str, str]] = ()  # (a, b, c): a is to b as c is to ?
    include_tokens: bool = False


@dataclass(frozen=True, slots=True)
class NextSentenceRequest:
    model: str
    pairs: Sequence[tuple[str, str]]  # (a, b): does b follow a?


@dataclass(frozen=True, slots=True)
class ClassifyRequest:
    model: str
    queries: Sequence[str]
    labels: Sequence[str]
    demonstrations: Sequence[tuple[str, str]] = ()  # (text, label)
    instruction: str = ""
    template: str = ""  # empty: the task's default template
    scoring: str | None = None  # one of SCORINGS; None: sum
    calibrate: bool = False
    content_free: str = ""  # empty: "N/A"


@dataclass(frozen=True, slots=True)
class Served(Generic[R]):
    """A task's result and the model (name and version) that computed it."""

    model: str
    version: str
    result: R


@dataclass(slots=True)
class Generation:
    """One prompt's whole output, gathered from its events."""

    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    finish_reason: str = ""  # "length", "stop" or "eos" once finished
    prompt_tokens: int = 0
    generated_tokens: int = 0
