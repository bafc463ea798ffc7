"""The `plm` command: `plm build` (train + export models), `plm serve` (run the server), `plm client …`.

Heavy imports happen inside each verb, so `plm client` starts fast and `plm serve` never imports torch.
What a user meets first is settled here: `--help` gives each option's default once (`[default]`); client output
is bold only on a terminal (never with `--json` or `NO_COLOR`); a port that is taken ends `plm serve` with one
line naming the address and the flag that changes it, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plm.service.config import ServerConfig

DEFAULT_TARGET = "127.0.0.1:50051"


class _Help(argparse.HelpFormatter):
    """Each option's default once, as `[default]` after its help. A help that already names its default in
    brackets keeps its own (a default layered from the config file or the environment, where argparse's is
    None); options that default to nothing or off say nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        d = action.default
        if (not action.option_strings or "[" in (action.help or "") or d is None or d is False
                or d is argparse.SUPPRESS or d == []):
            return action.help
        return f"{action.help} [%(default)s]"


def _parser(parent: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A verb's parser, with the help formatter of every verb."""
    sub: argparse.ArgumentParser = parent.add_parser(name, formatter_class=_Help, **kwargs)
    return sub


def _build_parser() -> argparse.ArgumentParser:
    from plm.service.config import ServerConfig

    d = ServerConfig()  # `plm serve`'s defaults, shown in its help (its flags default to None: config file first)
    p = argparse.ArgumentParser(prog="plm", description="Train, export and serve classic language models over gRPC.",
                                formatter_class=_Help)
    sub = p.add_subparsers(dest="command", required=True)

    b = _parser(sub, "build", help="train the models and write the model repository")
    b.add_argument("--profile", choices=["tiny", "small", "full"], default="small",
                   help="tiny: everything in under a minute (tests); small: the default models (10 minutes on "
                        "2 cores); full: trained long enough to show the lineage (sized for ~90 minutes on 2 cores)")
    b.add_argument("--device", default="cpu",
                   help="where the neural families train: cpu, cuda, cuda:N or auto (CUDA when torch sees a GPU); "
                        "export and evaluation run on the CPU")
    b.add_argument("--repository", type=Path, default=Path("repository"), help="model repository folder")
    b.add_argument("--corpus", type=Path, nargs="+", help="your own UTF-8 text files instead of the default corpus")
    b.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("PLM_CACHE", "cache")),
                   help="downloads and corpus cache (env PLM_CACHE)")
    b.add_argument("--families", nargs="+", metavar="FAMILY",
                   help="build only these families: ngram nnlm word2vec elmo gpt bert [all]")
    b.add_argument("--force", action="store_true", help="rebuild models even when an up-to-date build exists")
    b.add_argument("--seed", type=int, default=0, help="seed of the corpus split and of every model's training")
    b.add_argument("--variants", nargs="+", default=[], choices=["int8", "fused", "fp16"],
                   help="also write optimised graphs (dynamic int8, ORT transformer fusions, fp16) with their "
                        "accuracy change on held-out text in the manifest; serve one with runtime.variant")

    s = _parser(sub, "serve", help="serve the model repository over gRPC")
    s.add_argument("--repository", type=Path, help=f"model repository folder [{d.repository}]")
    s.add_argument("--host", help=f"address to bind [{d.host}]")
    s.add_argument("--port", type=int, help=f"gRPC port [{d.port}]")
    s.add_argument("--metrics-port", type=int, help=f"Prometheus /metrics port, 0 = off [{d.metrics_port}]")
    s.add_argument("--http-port", type=int, help=f"OpenAI-compatible HTTP API port, 0 = off [{d.http_port}]")
    s.add_argument("--config", type=Path, help="TOML config file (see README: Configuration)")
    s.add_argument("--log-format", choices=["text", "json"], help=f"log format [{d.log_format}]")
    s.add_argument("--models", nargs="+", help="serve only these models [every model in the repository]")
    s.add_argument("--workers", type=int,
                   help=f"server processes sharing the port (SO_REUSEPORT), each with every model [{d.workers}]")
    s.add_argument("--grace-seconds", type=float,
                   help=f"on SIGTERM, how long calls in flight may finish [{d.grace_seconds:g}]")
    s.add_argument("--reload-interval", type=float, help="poll the repository for model changes every this many "
                   f"seconds, 0 = off [{d.reload_interval_seconds:g}]")
    s.add_argument("--tls-cert", type=Path, help="PEM server certificate: serve TLS (with --tls-key)")
    s.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, help="PEM CA: require client certificates it signed (mutual TLS)")
    s.add_argument("--auth-tokens-file", type=Path, help="accepted bearer tokens, one per line: auth on")

    c = _parser(sub, "client", help="call a running server")
    c.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"host:port of the server, or several comma-separated (round-robin) [{DEFAULT_TARGET}]")
    c.add_argument("--json", action="store_true", help="print the raw response as JSON")
    c.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds [60]")
    c.add_argument("--retries", type=int, default=3,
                   help="retries on UNAVAILABLE / RESOURCE_EXHAUSTED, with backoff; several targets: round-robin [3]")
    c.add_argument("--token", default=os.environ.get("PLM_TOKEN"),
                   help="bearer token sent as `authorization: Bearer …` [env PLM_TOKEN]")
    c.add_argument("--tls-ca", type=Path, help="TLS: CA certificate (PEM) that signed the server's certificate")
    c.add_argument("--tls-cert", type=Path, help="mutual TLS: this client's certificate (PEM)")
    c.add_argument("--tls-key", type=Path, help="mutual TLS: this client's private key (PEM)")
    c.add_argument("--tls-server-name", help="TLS: the name on the server's certificate, when not the target host")
    c.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    verbs = c.add_subparsers(dest="verb", required=True)
    _parser(verbs, "models", help="list the models")
    _parser(verbs, "reload", help="reload the model repository now (AdminService/ReloadModels)")
    m = _parser(verbs, "model", help="one model's metadata")
    m.add_argument("name")
    h = _parser(verbs, "health", help="health status (overall, or of one model)")
    h.add_argument("service", nargs="?", default="", help="a model's name [the whole server]")
    sc = _parser(verbs, "score", help="sentence probability of each text (ranked)")
    sc.add_argument("model")
    sc.add_argument("texts", nargs="+")
    sc.add_argument("--no-eos", action="store_true", help="do not score the end of sentence")
    n = _parser(verbs, "next", help="most likely next words")
    n.add_argument("model")
    n.add_argument("contexts", nargs="+")
    n.add_argument("-k", "--top-k", type=int, default=5, help="words per context")
    n.add_argument("--tokens", action="store_true", help="also show the top next tokens")
    f = _parser(verbs, "fill", help="fill the [MASK] blanks of texts")
    f.add_argument("model")
    f.add_argument("texts", nargs="+")
    f.add_argument("-k", "--top-k", type=int, default=5, help="candidates per blank")
    f.add_argument("--target", dest="targets", action="append", default=[], help="restrict to this word (repeatable)")
    e = _parser(verbs, "embed", help="vectors of texts; nearest words and analogies (word2vec)")
    e.add_argument("model")
    e.add_argument("texts", nargs="*")
    e.add_argument("--pooling", choices=["mean", "cls", "none"], default=None,
                   help="one vector per text (mean of its tokens, or the [CLS] token's) or none: one per token "
                        "[the model's own: mean, or an imported sentence-transformers model's pooling]")
    e.add_argument("--normalize", action="store_true", help="scale each vector to length 1")
    e.add_argument("--nearest", type=int, default=None, help="nearest vocabulary words of each text")
    e.add_argument("--analogy", nargs=3, action="append", default=[], metavar=("A", "B", "C"),
                   help="a − b + c (king man woman); repeatable")
    e.add_argument("--layer-weights", type=float, nargs="+", help="ELMo: weights of its 3 layers")
    ns = _parser(verbs, "nsp", help="probability that B follows A (pairs given as A B A B ...)")
    ns.add_argument("model")
    ns.add_argument("sentences", nargs="+")
    cf = _parser(verbs, "classify", help="few-shot in-context classification")
    cf.add_argument("model")
    cf.add_argument("queries", nargs="+")
    cf.add_argument("--label", dest="labels", action="append", default=[],
                    help="a candidate label (repeatable; none: every label of a model with a trained head)")
    cf.add_argument("--demo", action="append", default=[], metavar="TEXT=LABEL",
                    help="a demonstration, TEXT=LABEL (repeatable)")
    cf.add_argument("--instruction", default="", help="text put before the demonstrations [none]")
    cf.add_argument("--scoring", choices=["sum", "token_mean", "per_char"], default="sum",
                    help="a label's score: its tokens' log-probabilities summed, their mean, or per character")
    cf.add_argument("--calibrate", action="store_true", help="contextual calibration with a content-free input")
    for name, help_ in (("generate", "generate text (one response)"), ("stream", "generate text, streamed")):
        g = _parser(verbs, name, help=help_)
        g.add_argument("model")
        g.add_argument("prompts", nargs="+")
        g.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens to generate at most")
        g.add_argument("--min-new-tokens", type=int, default=None, help="no end-of-sequence before this many [0]")
        g.add_argument("-t", "--temperature", type=float, default=None, help="0 = greedy [1.0]")
        g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens, 0 = off [0]")
        g.add_argument("--top-p", type=float, default=None,
                       help="sample among the likeliest tokens that reach this probability, 1 = off [1.0]")
        g.add_argument("--repetition-penalty", type=float, default=None,
                       help="above 1 discourages tokens already in the prompt or output, 1 = off [1.0]")
        g.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
        g.add_argument("--seed", type=int, default=None, help="same seed, same request: same text [random]")

    lt = _parser(sub, "loadtest", help="load-test running server(s): closed or open loop, weighted request mix")
    lt.add_argument("--target", default=DEFAULT_TARGET, help="host:port, or several comma-separated (round-robin)")
    lt.add_argument("--scenario", type=Path, help="JSON request mix {\"requests\": [{weight, rpc, model, ...}]}")
    lt.add_argument("--model", default="ngram-kn", help="without --scenario: Score requests on this model")
    lt.add_argument("--inputs", type=Path, help="sentences, one per line [a built-in list of 30]")
    mode = lt.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop: this many clients [1]")
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    lt.add_argument("--duration", type=float, default=10.0, help="measured seconds (after the warm-up)")
    lt.add_argument("--requests", type=int, help="stop after this many measured requests instead")
    lt.add_argument("--warmup", type=float, default=2.0, help="seconds of load excluded from the results")
    lt.add_argument("--processes", type=int, default=1, help="worker processes sharing the concurrency or rate")
    lt.add_argument("--connections", type=int, default=1,
                    help="TCP connections per target per process (server workers on one port spread connections)")
    lt.add_argument("--max-in-flight", type=int, default=1000,
                    help="open loop: arrivals beyond this many calls in flight are dropped by the client")
    lt.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds")
    lt.add_argument("--metrics-url", help="server /metrics URL, for its queue/inference/batch view of the window")
    lt.add_argument("--out", type=Path, help="write everything to this JSON (and a PNG beside it)")
    lt.add_argument("--seed", type=int, default=0, help="seed of the request mix's draws and of the arrivals")
    lt.add_argument("--quiet", action="store_true", help="no progress line")
    im = sub.add_parser("import", help="import a checkpoint made elsewhere into the model repository",
                        formatter_class=argparse.RawDescriptionHelpFormatter, description=_import_kinds())
    im.add_argument("kind", help="what the source is (listed above)")
    im.add_argument("path", type=Path, help="the checkpoint folder or file")
    im.add_argument("--name", help="model name in the repository [the source's folder or file name]")
    im.add_argument("--repository", type=Path, default=Path("repository"), help="model repository folder [repository]")
    im.add_argument("--max-length", type=int, help="a shorter window than the checkpoint's [the checkpoint's]")
    im.add_argument("--replace", action="store_true",
                    help="replace a model of that name (the old one serves until the new one is in place)")
    im.add_argument("--variants", nargs="+", default=[], choices=["int8", "fused", "fp16"],
                    help="also write these optimised graphs (bert, gpt2), each measured against the source on a "
                         "fixed set of texts and recorded in the manifest; serve one with runtime.variant")
    return p


def _import_kinds() -> str:
    from plm.export.importers import KINDS

    return "kinds:\n" + "\n".join(f"  {name:<10} {kind.help}" for name, kind in KINDS.items())


def _import(args: argparse.Namespace) -> int:
    from plm.export.importers import KINDS, import_model
    from plm.export.importers.common import ImportFailed

    if args.kind not in KINDS:
        print(f"plm import: unknown kind {args.kind!r}; kinds: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    try:
        manifest = import_model(args.kind, args.path, args.repository, args.name, args.max_length, args.replace,
                                args.variants)
    except ImportFailed as e:
        print(f"plm import: {e}", file=sys.stderr)
        return 1
    parity = manifest.get("parity_max_abs_diff")
    print(f"imported {manifest['name']} ({manifest['family']}: {', '.join(manifest['tasks'])}) into "
          f"{args.repository / manifest['name']}" + (f"; parity max |diff| {parity:.3g}" if parity is not None else ""))
    for variant, spec in manifest.get("variants", {}).items():
        acc = spec.get("accuracy", {})
        figures = [f"{k} {acc[k]:.6g}" for k in ("min_cosine_to_reference", "min_cosine_to_exported",
                                                 "test_token_perplexity_delta") if k in acc]
        print(f"  variant {variant}: {spec['graphs']}; {', '.join(figures) or spec.get('measured', '')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "build":
        from plm.export.build import build_repository

        try:
            build_repository(profile=args.profile, repository=args.repository, corpus_files=args.corpus,
                             cache_dir=args.cache_dir, families=args.families, force=args.force, seed=args.seed,
                             variants=args.variants, device=args.device)
        except ValueError as e:  # a request the build refuses before training anything: unknown family, device
            print(f"plm build: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "serve":
        raw = sys.argv[1:] if argv is None else argv
        return _serve(args, raw[raw.index("serve") + 1:])
    if args.command == "import":
        return _import(args)
    if args.command == "loadtest":
        from plm.client import loadtest

        return loadtest.main(args)
    return _client(args)


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The server's config from `plm serve`'s flags (over the config file and the environment)."""
    from plm.service.config import load_config

    overrides = {"repository": args.repository, "host": args.host, "port": args.port,
                 "metrics_port": args.metrics_port, "http_port": args.http_port, "log_format": args.log_format,
                 "models": tuple(args.models) if args.models else None, "grace_seconds": args.grace_seconds,
                 "workers": args.workers,
                 "reload_interval_seconds": args.reload_interval,
                 "security": {"tls_cert_file": args.tls_cert, "tls_key_file": args.tls_key,
                              "tls_client_ca_file": args.tls_client_ca, "auth_tokens_file": args.auth_tokens_file}}
    return load_config(args.config, overrides)


def _serve(args: argparse.Namespace, serve_argv: list[str]) -> int:
    from plm.service.server import run, setup_logging
    from plm.service.workers import PORT_TAKEN, Supervisor

    try:
        config = serve_config(args)
    except ValueError as e:
        print(f"plm serve: {e}", file=sys.stderr)
        return 2
    setup_logging(config)
    # A supervisor's worker says which port is taken and exits with PORT_TAKEN, so its supervisor stops at once
    # instead of restarting it; `plm serve` itself exits 1.
    taken_exit = PORT_TAKEN if config.supervisor_pid else 1
    # Checked before the models load (which takes a while) and before any worker starts.
    message = _taken_port(config)
    try:
        if message is None and config.workers > 1:
            return Supervisor(config, serve_argv).run()
        if message is None:
            return run(config)
    except (OSError, RuntimeError) as e:  # taken meanwhile: gRPC's RuntimeError, or the metrics server's OSError
        message = _bind_failure(e, config)
        if message is None:
            raise
    print(message, file=sys.stderr)
    return taken_exit


def _in_use(host: str, port: int, reuse_port: bool) -> bool:
    """Whether binding host:port as the server does fails because another socket holds it (EADDRINUSE)."""
    import errno
    import socket

    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # a host that does not resolve: the server's own bind says so
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            # The options gRPC's and http.server's listeners bind with: a port in TIME_WAIT is free to them, and
            # workers (reuse_port) share theirs with each other but not with a server that did not opt in.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


def _port_message(config: ServerConfig, metrics: bool, http: bool = False) -> str:
    """The one line that says which port is taken, who may hold it and which flag moves off it."""
    if http:
        return (f"plm serve: the HTTP address {config.host}:{config.http_port} is already in use (another "
                "server may be running): choose another port with --http-port, or --http-port 0 for none")
    if metrics:
        return (f"plm serve: the metrics address {config.host}:{config.metrics_port} is already in use (another "
                "server may be running): choose another port with --metrics-port, or --metrics-port 0 for none")
    return (f"plm serve: {config.host}:{config.port} is already in use (another server may be running): "
            "choose another port with --port")


def _taken_port(config: ServerConfig) -> str | None:
    """The one line for the first of the server's ports that another program holds, or None when all are free."""
    if config.port and _in_use(config.host, config.port, config.reuse_port):
        return _port_message(config, metrics=False)
    if config.http_port and _in_use(config.host, config.http_port, config.reuse_port):  # workers share it too
        return _port_message(config, metrics=False, http=True)
    if config.metrics_port and _in_use(config.host, config.metrics_port, reuse_port=False):
        return _port_message(config, metrics=True)
    return None


def _bind_failure(e: BaseException, config: ServerConfig) -> str | None:
    """The one line for a bind that failed after the check: the metrics server's OSError, gRPC's RuntimeError
    (or service/server.py's OSError when gRPC returns port 0); None for any other error."""
    import errno

    if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:  # the metrics or the HTTP socket
        # The HTTP port binds after the metrics port, which this process then holds itself: ask about HTTP's.
        http = bool(config.http_port) and _in_use(config.host, config.http_port, config.reuse_port)
        return _port_message(config, metrics=True, http=http)
    text = str(e)
    if not (text.startswith("Failed to bind to address") or text.startswith("cannot bind")):
        return None
    if _in_use(config.host, config.port, config.reuse_port):
        return _port_message(config, metrics=False)
    return f"plm serve: cannot bind {config.host}:{config.port}: choose another address with --host or --port"


def _bold(text: str) -> str:
    """`text` in bold on a terminal; plain when stdout is a pipe or a file, and under NO_COLOR (no-color.org)."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\033[1m{text}\033[0m"
    return text


def _client(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from plm.api.v1 import admin_pb2, admin_pb2_grpc
    from plm.api.v1 import plm_pb2 as pb
    from plm.client import PlmClient, RetryPolicy, TlsConfig

    def show(msg: Any, text: str) -> None:
        if args.json:
            print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), ensure_ascii=False, indent=2))
        else:
            print(text)

    try:
        tls = None
        if args.tls or args.tls_ca or args.tls_cert or args.tls_key or args.tls_server_name:
            tls = TlsConfig(ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key,
                            server_name=args.tls_server_name)
        cl = PlmClient(args.target.split(","), timeout=args.timeout, retry=RetryPolicy(max_attempts=args.retries + 1),
                       tls=tls, token=args.token)
    except (ValueError, OSError) as e:
        print(f"plm client: {e}", file=sys.stderr)
        return 2
    with cl:
        try:
            if args.verb == "reload":
                rr = admin_pb2_grpc.AdminServiceStub(cl.channels[0]).ReloadModels(
                    admin_pb2.ReloadModelsRequest(), timeout=args.timeout, metadata=cl.conn.metadata(None))
                show(rr, "\n".join(f"{c.name:20} {admin_pb2.ReloadAction.Name(c.action)[14:].lower():10} "
                                   f"{c.version} {c.error}" for c in rr.changes))
            elif args.verb == "models":
                r = cl.list_models()
                show(r, "\n".join(f"{m.name:20} {m.family:8} v{m.version:16} tasks={','.join(m.tasks)} "
                                  f"vocab={m.vocab_size} max_length={m.max_length}" for m in r.models))
            elif args.verb == "model":
                r = cl.get_model(args.name)
                show(r, str(r))
            elif args.verb == "health":
                status = cl.health_status(args.service)
                print(json.dumps({"service": args.service, "status": status}) if args.json else status)
            elif args.verb == "score":
                r = cl.score(args.model, args.texts, add_eos=not args.no_eos)
                lines = []
                for rank, i in enumerate(r.ranking, 1):
                    s = r.scores[i]
                    lines.append(f"#{rank} log_prob={s.log_prob:.4f} (log10 {s.log10_prob:.4f}) "
                                 f"ppl/token={s.perplexity:.2f} ppl/word={s.word_perplexity:.2f} "
                                 f"tokens={s.num_tokens} oov={s.num_oov}  {s.text}")
                    lines.extend(f"      {t.log_prob:9.4f}  {t.token}" for t in s.tokens)
                show(r, "\n".join(lines))
            elif args.verb == "next":
                r = cl.predict_next(args.model, args.contexts, top_k=args.top_k, include_tokens=args.tokens)
                lines = []
                for pred in r.predictions:
                    lines.append(f"{pred.context!r} →")
                    lines.extend(f"  {c.prob:8.4f}  {c.text}" for c in pred.words)
                    if pred.tokens:
                        lines.append("  tokens:")
                        lines.extend(f"  {c.prob:8.4f}  {c.text!r}" for c in pred.tokens)
                show(r, "\n".join(lines))
            elif args.verb == "fill":
                fr = cl.fill_mask(args.model, args.texts, top_k=args.top_k, targets=args.targets)
                lines = []
                for res in fr.results:
                    lines.append(res.text)
                    for m in res.masks:
                        lines.append(f"  [MASK] #{m.index}:")
                        lines.extend(f"    {c.score:8.4f}  {c.token_str:15} {c.sequence}" for c in m.candidates)
                show(fr, "\n".join(lines))
            elif args.verb == "embed":
                er = cl.embed(args.model, args.texts, pooling=args.pooling, normalize=args.normalize,
                              layer_weights=args.layer_weights or (), nearest_k=args.nearest,
                              analogies=[tuple(a) for a in args.analogy])
                lines = [f"dimension {er.dimension}"]
                for emb in er.embeddings:
                    head = ", ".join(f"{x:.3f}" for x in emb.vector[:6])
                    lines.append(f"{emb.text!r}: [{head}{', …' if len(emb.vector) > 6 else ''}]")
                    lines.extend(f"    {n.cosine:.3f}  {n.word}" for n in emb.nearest)
                for an in er.analogies:
                    lines.append(f"{an.query.a} − {an.query.b} + {an.query.c} ≈ "
                                 + ", ".join(f"{n.word} ({n.cosine:.3f})" for n in an.answers))
                show(er, "\n".join(lines))
            elif args.verb == "nsp":
                if len(args.sentences) % 2:
                    print("plm client nsp: give sentences in pairs: A B [A B ...]", file=sys.stderr)
                    return 2
                it = iter(args.sentences)
                nr = cl.predict_next_sentence(args.model, list(zip(it, it, strict=True)))
                show(nr, "\n".join(f"{r.is_next_prob:.4f}  {r.a!r} → {r.b!r}" for r in nr.results))
            elif args.verb == "classify":
                demos = [(t, lab) for t, _, lab in (d.rpartition("=") for d in args.demo)]
                cr = cl.classify(args.model, args.queries, args.labels, demonstrations=demos,
                                 instruction=args.instruction, scoring=args.scoring, calibrate=args.calibrate)
                show(cr, "\n".join(f"{c.label:12} {c.query!r}  ("
                                    + ", ".join(f"{s.label} {s.probability:.3f}" for s in c.scores) + ")"
                                    for c in cr.results))
            else:
                sampling = pb.SamplingParams(max_new_tokens=args.max_new_tokens, stop=args.stop)
                for field in ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "min_new_tokens"):
                    if getattr(args, field) is not None:
                        setattr(sampling, field, getattr(args, field))
                if args.verb == "generate":
                    g = cl.generate(args.model, args.prompts, sampling)
                    show(g, "\n".join(
                        f"{x.prompt}{_bold(x.text)}  [{pb.FinishReason.Name(x.finish_reason)}, "
                        f"{x.generated_tokens} tokens]" for x in g.generations))
                else:
                    for ev in cl.generate_stream(args.model, args.prompts, sampling):
                        if args.json:
                            show(ev, "")
                        elif ev.finish_reason:
                            print(f"  [{ev.index}: {pb.FinishReason.Name(ev.finish_reason)}, "
                                  f"{ev.generated_tokens} tokens]", flush=True)
                        else:
                            print(ev.text_delta, end="", flush=True)
        except grpc.RpcError as e:
            print(f"plm client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
