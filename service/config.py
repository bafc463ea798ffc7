"""The server's one configuration object, built once from defaults ← TOML file ← environment ← flags.

Only this module reads `os.environ`. Everything downstream receives the frozen `ServerConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Per-request limits; violating one is INVALID_ARGUMENT naming the field and the limit."""

    max_inputs_per_request: int = 64  # texts/contexts/prompts in one request: bounds one request's share of a batch
    max_text_chars: int = 20_000  # characters per input, checked before tokenizing (tokenizing is O(n))
    max_top_k: int = 100  # top_k above this is never useful to a caller and costs a larger sort
    max_beam_width: int = 16  # word-completion beam: each step is one batched forward of this many rows
    max_word_tokens: int = 8  # longest word followed by the completion search
    max_new_tokens: int = 512  # still capped by the model's window minus the prompt
    max_stop_sequences: int = 8
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's own default; raise it for big batched requests
    # RPCs being handled at once, all models together; beyond it RESOURCE_EXHAUSTED before any work. Each
    # in-flight call holds its request, its rows and a coroutine: this bounds the server's memory under a burst.
    max_inflight_requests: int = 256


@dataclass(frozen=True)
class Batching:
    """Dynamic batching of one model's requests (overridable per model in the config file)."""

    max_batch_size: int = 32  # rows per ONNX run: past ~32 the 2-core CPU gains no throughput
    max_batch_tokens: int = 8192  # padded rows × length per run; bounds memory of a [B,T,V] log-softmax
    # A queued row joins a batch only while the batch's real tokens stay at least this share of its padded
    # rows × longest row; rows left out wait for a batch nearer their own length (the oldest row always runs).
    min_padding_efficiency: float = 0.8
    max_queue_delay_ms: float = 2.0  # how long the first request waits for company; small vs inference time
    idle_dispatch: bool = True  # wait for company only under load; an idle model runs a lone request at once
    # ...on the event loop itself when its fastest recent batch took less than this (0 = always on the model's
    # thread): two thread wake-ups cost more than blocking the loop for a sub-millisecond run (NNLM PredictNext
    # at concurrency 1, on and off: benchmarks/serving.py, docs/benchmarks.md).
    inline_max_ms: float = 1.0
    max_queue_size: int = 1024  # queued rows beyond this are refused with RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Runtime:
    """ONNX Runtime session settings (overridable per model: `[model.NAME.runtime]`)."""

    # Execution providers in priority order ("tensorrt", "cuda", "cpu" or ORT's full names). Empty = automatic:
    # TensorRT, then CUDA, then CPU, those this onnxruntime build has. Configured providers that are missing
    # here are skipped with a warning; CPU is always the last resort.
    providers: tuple[str, ...] = ()
    # Options per provider, as ONNX Runtime names them, e.g. {"CUDAExecutionProvider": {"device_id": 0,
    # "gpu_mem_limit": 2147483648}, "TensorrtExecutionProvider": {"trt_fp16_enable": True,
    # "trt_engine_cache_enable": True, "trt_engine_cache_path": "cache/trt"}}.
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    intra_op_threads: int = 0  # 0 = one per core: one batch runs at a time per model, so it may use them all
    graph_optimization: str = "all"  # disable | basic | extended | all
    memory_arena: bool = True  # ORT's CPU arena: reuses buffers between runs of varying shapes (faster, more RSS)
    # ORT's intra-op threads spin-wait for the next run by default. In a server the next run is rarely
    # microseconds away, and a spinning thread takes a core from the event loop and the other models.
    spin_wait: bool = False
    # ...but the generation engine's decoder runs step after step with little time between them: there spinning
    # threads catch the next step (benchmarks/engine_step.py; docs/benchmarks.md, "Runtime settings").
    decoder_spin_wait: bool = True
    kv_cache: bool = True  # generate with the KV-cache decoder and continuous batching when a model has one
    # The decoder's keys and values stay where its provider computes them between decode steps (ORT IO binding):
    # "auto" = on when the decoder runs on a GPU (CUDA, TensorRT), where `run` would copy every past to the device
    # and every present back each step; "on" also on CPU (no faster there: docs/benchmarks.md); "off" = never.
    io_binding: str = "auto"
    # Classify over the engine's cached prefix keys and values (few-shot demonstrations computed once; each label
    # token then one decode step) or, when false, over whole sequences (one batched forward through the batcher).
    # The prefix is the faster of the two on CPU; on a GPU they are within noise (docs/benchmarks.md).
    prefix_reuse: bool = True
    variant: str = ""  # an optimised graph the model folder holds ("int8", "fused", "fp16"); "" = the exported one


@dataclass(frozen=True)
class Security:
    """TLS, mutual TLS and bearer-token auth (docs/reliability.md has the threat model)."""

    tls_cert_file: Path | None = None  # PEM server certificate (chain); set with tls_key_file = TLS on
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # set = mutual TLS: clients must present a certificate signed by it
    auth_token: str = ""  # one accepted bearer token (prefer a file: env and flags show in `ps`)
    auth_tokens_file: Path | None = None  # one accepted token per line; '#' comments and blank lines ignored
    # Services a caller reaches without a token: probes (kubelet, load balancers) carry none.
    open_services: tuple[str, ...] = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                                      "grpc.reflection.v1.ServerReflection")

    def tokens(self) -> frozenset[str]:
        """Every accepted token; empty = auth off."""
        tokens = {self.auth_token} if self.auth_token else set()
        if self.auth_tokens_file is not None:
            lines = Path(self.auth_tokens_file).read_text(encoding="utf-8").splitlines()
            tokens |= {t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")}
        return frozenset(tokens)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the port is a deliberate choice
    port: int = 50051
    metrics_port: int = 9090  # 0 turns the metrics HTTP endpoint off
    # The OpenAI-compatible HTTP API (/v1/completions, /v1/embeddings, /v1/models: service/frontends/openai_http.py)
    # on this port, in the same process and event loop as gRPC, with the same TLS and bearer tokens; 0 = off.
    # 8000 is where OpenAI-compatible servers (vLLM, SGLang, TGI's router) listen by default.
    http_port: int = 8000
    # Server processes on the port (service/workers.py): one event loop per process is the ceiling of cheap
    # calls, so on a machine with spare cores N workers answer up to N times as many. Each loads every model.
    workers: int = 1
    # GenerateStream sends a sequence's tokens every this many tokens (its first token and its end at once):
    # fewer, larger messages cost the server and the client less per token; 1 = each token as it is made.
    stream_interval: int = 1
    reuse_port: bool = False  # bind with SO_REUSEPORT (set for workers; off: a second server on the port fails)
    supervisor_pid: int = 0  # set by the supervisor for its workers: ReloadModels there reloads every worker
    repository: Path = Path("repository")
    models: tuple[str, ...] = ()  # serve only these model names; empty = every model in the repository
    log_format: str = "text"  # text | json
    log_level: str = "INFO"
    # Log lines below WARNING reach stderr at most this late (buffered: no write system call per access line on
    # the event loop); 0 writes every line at once.
    log_buffer_seconds: float = 0.2
    grace_seconds: float = 10.0  # on SIGTERM, in-flight requests get this long to finish
    # gRPC pins a client to one server for the life of its HTTP/2 connection; closing connections after this
    # age (plus grace_seconds for calls in flight) lets clients behind a load balancer spread to new replicas.
    # 0 = never (loopback and client-side round-robin need no rotation).
    max_connection_age_seconds: float = 0.0
    # Poll the repository for added, changed and removed models this often; 0 = only on
    # plm.v1.AdminService/ReloadModels. Off by default: what a server serves changes only when asked.
    reload_interval_seconds: float = 0.0
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)
    runtime: Runtime = field(default_factory=Runtime)
    security: Security = field(default_factory=Security)
    model_batching: dict[str, Batching] = field(default_factory=dict)  # per-model overrides by name
    model_runtime: dict[str, Runtime] = field(default_factory=dict)  # per-model overrides by name

    def runtime_for(self, model: str) -> Runtime:
        """The ONNX Runtime settings of one model: the server's, or the config file's per-model section."""
        return self.model_runtime.get(model, self.runtime)

    def batching_for(self, model: str, manifest_batching: Mapping[str, Any] | None = None) -> Batching:
        """The batching settings of one model: server default ← manifest ← config file's per-model section."""
        if model in self.model_batching:
            return self.model_batching[model]
        if manifest_batching:
            return _replace_checked(self.batching, manifest_batching, f"manifest of {model}: batching")
        return self.batching


def _replace_checked(obj: Any, values: Mapping[str, Any], where: str) -> Any:
    """dataclasses.replace, but unknown keys and wrong types are an error naming `where`."""
    known = {f.name: f for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        current = getattr(obj, key)
        if isinstance(current, Path):
            value = Path(value)
        elif current is None and key.endswith("_file"):
            value = Path(value) if value else None  # an empty value (PLM_SECURITY__X="") leaves the file unset
        elif isinstance(current, tuple):
            value = tuple(value) if isinstance(value, list | tuple) else tuple(v for v in str(value).split(",") if v)
        elif isinstance(current, dict):
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ValueError(f"{where}: {key} must be a table of tables, got {value!r}")
            value = {**current, **value}
        elif isinstance(current, bool):
            value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        elif isinstance(current, int | float) and not isinstance(value, int | float):
            try:
                value = type(current)(value)
            except ValueError as e:
                raise ValueError(f"{where}: {key} must be a number, got {value!r}") from e
        elif isinstance(current, float):
            value = float(value)
        changes[key] = value
    return dataclasses.replace(obj, **changes)


_SECTIONS = {"limits": Limits, "batching": Batching, "runtime": Runtime, "security": Security}


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> ServerConfig:
    """Build the config: defaults, then the TOML file, then `PLM_*` environment variables, then overrides.

    Environment variables name top-level settings (`PLM_PORT`, `PLM_REPOSITORY`) or sectioned ones
    (`PLM_BATCHING__MAX_BATCH_SIZE`). `overrides` are command-line flags already parsed (None = not given;
    a dict of a section's flags overrides only the settings given).
    """
    cfg = ServerConfig()
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"config file {path}: {e}") from e
    env = os.environ if environ is None else environ
    top = {f.name for f in dataclasses.fields(ServerConfig)}
    for key, value in env.items():
        if not key.startswith("PLM_"):
            continue
        name = key[4:].lower()
        section, _, sub = name.partition("__")
        # Only names of settings count: other PLM_* variables (PLM_CACHE for `plm build`) are not ours.
        if sub and section in _SECTIONS and sub in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            data.setdefault(section, {})[sub] = value
        elif not sub and name in top and name not in _SECTIONS and not name.startswith("model_"):
            data[name] = value
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):  # a section's flags: each given one overrides that setting only
            data.setdefault(key, {}).update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
            data[key] = value

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = _replace_checked(cls(), data.pop(name, {}), f"config [{name}]")
    per_model: dict[str, Batching] = {}
    per_model_runtime: dict[str, Runtime] = {}
    for model, settings in data.pop("model", {}).items():
        unknown = set(settings) - {"batching", "runtime"}
        if unknown:
            raise ValueError(f"config [model.{model}]: unknown section(s) {', '.join(sorted(unknown))} "
                             "(known: batching, runtime)")
        if "batching" in settings:
            per_model[model] = _replace_checked(sections["batching"], settings["batching"],
                                                f"config [model.{model}.batching]")
        if "runtime" in settings:
            per_model_runtime[model] = _replace_checked(sections["runtime"], settings["runtime"],
                                                        f"config [model.{model}.runtime]")
    cfg = _replace_checked(cfg, data, "config")
    if cfg.workers < 1:
        raise ValueError(f"config: workers must be at least 1, got {cfg.workers}")
    if cfg.stream_interval < 1:
        raise ValueError(f"config: stream_interval must be at least 1, got {cfg.stream_interval}")
    if cfg.workers > 1 and cfg.port == 0:
        raise ValueError("config: workers > 1 needs a fixed port (each worker binding port 0 would get its own)")
    for where, rt in (("config [runtime]", sections["runtime"]),
                      *((f"config [model.{m}.runtime]", r) for m, r in per_model_runtime.items())):
        for key, allowed in (("graph_optimization", ("disable", "basic", "extended", "all")),
                             ("io_binding", ("auto", "on", "off"))):
            if getattr(rt, key) not in allowed:
                raise ValueError(f"{where}: {key} must be one of {', '.join(allowed)}, got {getattr(rt, key)!r}")
    return dataclasses.replace(cfg, model_batching=per_model, model_runtime=per_model_runtime, **sections)
