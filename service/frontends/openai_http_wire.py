"""The OpenAI-compatible API's wire format: JSON bodies → the data plane's typed requests, typed results → JSON,
and the error table as HTTP statuses with OpenAI's error body.

Bodies are checked as OpenAI's API checks them: a parameter of the wrong type, out of range or unknown is a
400 naming it (`param`). Unknown parameters are refused, as api.openai.com refuses them ("Unrecognized request
argument supplied"), rather than ignored: a client that sends `best_of` or `logit_bias` expecting an effect
hears that it gets none. OpenAI's parameters that plm cannot honour are accepted only at their neutral value
(`frequency_penalty: 0`, `logit_bias: {}`), so a client that sends its defaults works. `null` is "not given".
Three of vLLM's extensions are accepted for sampling the data plane has: `top_k`, `repetition_penalty`,
`min_tokens`.
"""

from __future__ import annotations

import base64
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from plm.service.dataplane import requests as rq
from plm.service.errors import InvalidArgument, ServiceError
from plm.service.frontends.http_edge import HTTP_STATUS, http_status
from plm.service.frontends.http_edge import json_kind as _kind
from plm.service.tasks import generate as gen_task
from plm.service.tasks.embed import EmbedResponse
from plm.service.tasks.score import SentenceResult

# Status name (service/errors.py) → OpenAI error type; the HTTP status is http_edge's. Codes the table lacks are 500.
_TYPES: Mapping[str, str] = {
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",  # the model does not serve the task
    "UNAUTHENTICATED": "invalid_request_error",
    "NOT_FOUND": "invalid_request_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
    "UNAVAILABLE": "server_error",
    "DEADLINE_EXCEEDED": "timeout_error",
    "INTERNAL": "server_error",
}
STATUS: Mapping[str, tuple[int, str]] = {name: (HTTP_STATUS[name], kind) for name, kind in _TYPES.items()}

# Data plane field → OpenAI parameter, per endpoint (InvalidArgument.renamed).
COMPLETION_PARAMS: Mapping[str, str] = {
    "model": "model", "prompts": "prompt", "max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty",
    "stop": "stop", "seed": "seed", "texts": "prompt",  # texts: the Score of echo / logprobs
}
EMBEDDING_PARAMS: Mapping[str, str] = {"model": "model", "texts": "input"}

MAX_LOGPROBS = 5  # alternatives per token, OpenAI's own limit for the legacy completions endpoint
_FINISH = {gen_task.FINISH_LENGTH: "length", gen_task.FINISH_STOP: "stop", gen_task.FINISH_EOS: "stop"}
_COMPLETION_KEYS = frozenset((
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options",
    "logprobs", "echo", "user", "suffix", "best_of", "frequency_penalty", "presence_penalty", "logit_bias",
    "top_k", "repetition_penalty", "min_tokens"))
_EMBEDDING_KEYS = frozenset(("model", "input", "encoding_format", "dimensions", "user"))


def error_body(status: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error body) of a status name from the error table."""
    http, kind = STATUS.get(status, STATUS["INTERNAL"])
    return http, {"error": {"message": message, "type": kind, "param": param, "code": status.lower()}}


def service_error_body(error: ServiceError, request_id: str) -> tuple[int, dict[str, Any]]:
    """An error of the data plane (its field already renamed) as the HTTP status and body."""
    param = error.field if isinstance(error, InvalidArgument) else None
    _, body = error_body(error.code, f"{error.message} (request_id={request_id})", param)
    return http_status(error), body


# ------------------------------------------------------------------------------------------- values


def _unknown(body: Mapping[str, Any], known: frozenset[str]) -> None:
    for key in body:
        if key not in known:
            raise InvalidArgument(key, "unrecognized request argument (refused, as OpenAI's API refuses it)")


def _text(value: object, param: str, at: str = "") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(param, f"must be a string, got {_kind(value)}", at)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(param, "is not valid Unicode (a lone surrogate escape)", at) from None
    return value


def _texts(value: object, param: str) -> tuple[list[str], bool]:
    """A string or an array of strings → (the strings, whether it was one string)."""
    if isinstance(value, str):
        return [_text(value, param)], True
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or isinstance(value[0], list):
            raise InvalidArgument(param, "is token ids; give text (plm tokenizes with each model's own tokenizer)")
        return [_text(v, param, f"[{i}]") for i, v in enumerate(value)], False
    if isinstance(value, list):
        raise InvalidArgument(param, "is empty; give at least one")
    raise InvalidArgument(param, f"must be a string or an array of strings, got {_kind(value)}")


def _int(body: Mapping[str, Any], param: str) -> int | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(param, f"must be an integer, got {_kind(value)}")
    return value


def _number(body: Mapping[str, Any], param: str) -> float | None:
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(param, f"must be a number, got {_kind(value)}")
    if isinstance(value, int) and abs(value) > sys.float_info.max:
        raise InvalidArgument(param, "is out of range")
    return float(value)


def _bool(body: Mapping[str, Any], param: str) -> bool:
    value = body.get(param)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(param, f"must be a boolean, got {_kind(value)}")
    return value


def _neutral(body: Mapping[str, Any], param: str, neutral: object, why: str) -> None:
    value = body.get(param)
    if value is not None and value != neutral:
        raise InvalidArgument(param, f"is not supported ({why}); leave it out or set it to {json.dumps(neutral)}")


def model_name(body: Mapping[str, Any]) -> str:
    value = body.get("model")
    if value is None:
        raise InvalidArgument("model", "is required (GET /v1/models lists the names)")
    return _text(value, "model")


# -------------------------------------------------------------------------------------- completions


@dataclass(frozen=True)
class Completion:
    """A /v1/completions body: the data plane's request and what only this endpoint asks for."""

    request: rq.GenerateRequest  # prompts repeated n times: prompt i's choices are n*i .. n*i+n-1
    n: int
    single: bool  # prompt was a string, not an array
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    echo: bool
    logprobs: int | None  # None: not asked; 0: the chosen tokens' log-probabilities; k: and k alternatives each
    generate: bool  # False for max_tokens 0 with echo: only the prompt's scores

    @property
    def prompts(self) -> Sequence[str]:
        return self.request.prompts[::self.n]


def completion(body: Mapping[str, Any], limits_max_inputs: int) -> Completion:
    _unknown(body, _COMPLETION_KEYS)
    model = model_name(body)
    if body.get("prompt") is None:
        raise InvalidArgument("prompt", "is required")
    prompts, single = _texts(body["prompt"], "prompt")
    n = _int(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= limits_max_inputs:
        raise InvalidArgument("n", f"is {n}; must be between 1 and {limits_max_inputs} (max_inputs_per_request)")
    if len(prompts) > limits_max_inputs:
        raise InvalidArgument("prompt", f"has {len(prompts)} entries; at most {limits_max_inputs} per request")
    if len(prompts) * n > limits_max_inputs:
        raise InvalidArgument("n", f"is {n} for {len(prompts)} prompts: {len(prompts) * n} completions; at most "
                                   f"{limits_max_inputs} per request (max_inputs_per_request)")
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != n:
        raise InvalidArgument("best_of", "is not supported (every sample is returned); leave it out or set it to n")
    _neutral(body, "suffix", "", "no model here fills in the middle")
    for penalty in ("frequency_penalty", "presence_penalty"):
        _neutral(body, penalty, 0, "use repetition_penalty")
    _neutral(body, "logit_bias", {}, "sampling takes no per-token biases")
    if body.get("user") is not None:
        _text(body["user"], "user")
    stop = body.get("stop")
    stops = [] if stop is None else _texts(stop, "stop")[0]
    logprobs = _int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidArgument("logprobs", f"is {logprobs}; must be between 0 and {MAX_LOGPROBS} (the most likely "
                                          "tokens reported beside each chosen one, as OpenAI's API allows)")
    echo = _bool(body, "echo")
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise InvalidArgument("stream_options", "must be an object with include_usage")
        if not stream:
            raise InvalidArgument("stream_options", "is only allowed with stream: true")
        include_usage = _bool(options, "include_usage")
    max_tokens = _int(body, "max_tokens")
    generate = not (max_tokens == 0 and echo)  # echo with max_tokens 0: the prompt's log-probabilities alone
    request = rq.GenerateRequest(
        model, [p for p in prompts for _ in range(n)],
        temperature=_number(body, "temperature"), top_k=_int(body, "top_k"), top_p=_number(body, "top_p"),
        repetition_penalty=_number(body, "repetition_penalty"),
        max_new_tokens=16 if max_tokens is None else max_tokens,  # OpenAI's default for completions
        min_new_tokens=_int(body, "min_tokens"), stop=stops, seed=_int(body, "seed"))
    return Completion(request, n, single, stream, include_usage, echo, logprobs, generate)


def renamed(error: ServiceError, names: Mapping[str, str], n: int = 1, single: bool = False) -> ServiceError:
    """A data plane error under the endpoint's parameter names; `[i]` of a repeated prompt is its prompt's."""
    if not isinstance(error, InvalidArgument):
        return error
    error = error.renamed(names)
    at = error.at
    if error.field == "prompt" and at.startswith("[") and "]" in at:
        index, rest = at[1:].split("]", 1)
        at = "" if single else f"[{int(index) // n}]{rest}" if index.isdigit() else at
    return InvalidArgument(error.field, error.problem, at) if at != error.at else error


def text_offsets(text: str, tokens: Sequence[str]) -> list[int]:
    """Where each token's text starts in `text`: where it is next found (case-blind: word models lower-case); a
    token whose text is not there as it is (a byte of a character split by byte-level BPE) takes the offset
    reached so far."""
    lowered = text.lower()
    offsets = []
    pos = 0
    for token in tokens:
        found = lowered.find(token.lower(), pos) if token else -1
        offsets.append(found if found >= 0 else pos)
        if found >= 0:
            pos = found + len(token)
    return offsets


def reported(sentence: SentenceResult, start: int) -> list[tuple[int, int]]:
    """(index in `sentence.tokens`, text offset) of its tokens whose text starts at or after character `start`."""
    offsets = text_offsets(sentence.text, [t.token for t in sentence.tokens])
    return [(i, o) for i, o in enumerate(offsets) if o >= start]


def logprobs_body(tokens: Sequence[str], log_probs: Sequence[float], offsets: Sequence[int],
                  tops: Sequence[dict[str, float]] | None = None) -> dict[str, Any]:
    """OpenAI's logprobs object; `tops`: each token's alternatives (logprobs > 0), in which the chosen token takes
    its own log-probability; without them (logprobs 0) the chosen token alone."""
    lps = [finite_or_none(x) for x in log_probs]
    if tops is None:
        top: list[dict[str, float | None]] = [{t: lp} for t, lp in zip(tokens, lps, strict=True)]
    else:
        top = []
        for t, lp, alternatives in zip(tokens, lps, tops, strict=True):
            entry: dict[str, float | None] = dict(alternatives)
            entry[t] = lp  # the chosen token's own figure, so token_logprobs and top_logprobs agree
            top.append(entry)
    return {"tokens": list(tokens), "token_logprobs": lps, "top_logprobs": top, "text_offset": list(offsets)}


def sentence_logprobs(sentence: SentenceResult, start: int,
                      tops: Sequence[dict[str, float]] | None = None) -> dict[str, Any]:
    """The logprobs object of the tokens of a scored text from character `start` on (`reported`); offsets are in
    the whole text (a completion's count its prompt, echoed or not); `tops`: one per reported token."""
    rows = reported(sentence, start)
    tokens = sentence.tokens
    return logprobs_body([tokens[i].token for i, _ in rows], [tokens[i].log_prob for i, _ in rows],
                         [o for _, o in rows], tops)


def completion_choice(index: int, text: str, finish: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _FINISH.get(finish, finish)}


def completion_body(c: Completion, request_id: str, model: str, gens: Sequence[rq.Generation],
                    scores: Sequence[SentenceResult] | None,
                    tops: Sequence[Sequence[dict[str, float]]] | None = None) -> dict[str, Any]:
    """The response of a unary completion: a choice per generation, in order; `scores`: one per choice, the
    scored prompt (+ completion) for echo / logprobs; `tops`: per choice, each reported token's alternatives."""
    choices = []
    for i, g in enumerate(gens):
        text = g.prompt + g.text if c.echo else g.text
        lp = None
        if scores is not None and c.logprobs is not None:
            start = 0 if c.echo else len(g.prompt)
            lp = sentence_logprobs(scores[i], start, tops[i] if tops is not None else None)
        choices.append(completion_choice(i, text, g.finish_reason, lp))
    prompt_tokens = sum(g.prompt_tokens for g in gens[::c.n])
    completion_tokens = sum(g.generated_tokens for g in gens)
    return {"id": f"cmpl-{request_id}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict[str, int]:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(request_id: str, model: str, created: int, choices: list[dict[str, Any]],
          usage_: dict[str, int] | None = None) -> bytes:
    """One server-sent event of a streamed completion."""
    body: dict[str, Any] = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created,
                            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def stream_error(error: ServiceError, request_id: str) -> bytes:
    """An error after the stream began (its status is already 200): an event the SDKs raise from."""
    return b"data: " + json.dumps(service_error_body(error, request_id)[1]).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class Embedding:
    request: rq.EmbedRequest
    base64: bool
    dimensions: int | None


def embedding(body: Mapping[str, Any]) -> Embedding:
    _unknown(body, _EMBEDDING_KEYS)
    model = model_name(body)
    if body.get("input") is None:
        raise InvalidArgument("input", "is required")
    texts, _ = _texts(body["input"], "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidArgument("encoding_format", f"is {_short(fmt)}; use float or base64")
    dimensions = _int(body, "dimensions")
    if body.get("user") is not None:
        _text(body["user"], "user")
    return Embedding(rq.EmbedRequest(model, texts), fmt == "base64", dimensions)


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_dimensions(e: Embedding, model: str, dimension: int) -> None:
    if e.dimensions is not None and e.dimensions != dimension:
        raise InvalidArgument("dimensions", f"is {e.dimensions}; model {model!r} makes {dimension}-dimensional "
                                            "vectors and cannot shorten them (leave dimensions out)")


def embedding_body(e: Embedding, model: str, res: EmbedResponse, prompt_tokens: int) -> dict[str, Any]:
    data = []
    for i, r in enumerate(res.embeddings):
        vector = r.vector if r.vector is not None else np.zeros(res.dimension, np.float32)
        value: Any = (base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode() if e.base64
                      else [float(x) for x in vector.tolist()])
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model, "usage": usage(prompt_tokens)}


def finite_or_none(x: float) -> float | None:
    """JSON has no -inf: a log-probability of an impossible token is null."""
    return x if math.isfinite(x) else None
