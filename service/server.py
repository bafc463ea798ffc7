"""The server process: load the repository, start gRPC (plm.v1 + admin + KServe v2 + health + reflection), the
OpenAI-compatible HTTP API and /metrics, stop cleanly.

The wiring: one DataPlane (service/dataplane/) over the registry, admission and metrics, and the front ends
(service/frontends/) over it, each translating its own wire format; gRPC and HTTP share one event loop.

Health: the overall service ("") and `plm.v1.LanguageModelService` are SERVING once every model is loaded;
each model name is its own health service, SERVING when that model is ready (hot reload keeps it so). On
SIGTERM/SIGINT health turns NOT_SERVING first, new calls are refused with UNAVAILABLE, in-flight calls and
streams get `grace_seconds` to finish, then it exits 0. TLS, mutual TLS and token auth: service/security.py.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from plm.service import faults, logs
from plm.service.admission import Admission
from plm.service.config import ServerConfig
from plm.service.dataplane.plane import DataPlane
from plm.service.frontends.kserve import SERVICE_NAME as KSERVE_SERVICE_NAME
from plm.service.frontends.kserve import KServeServicer
from plm.service.frontends.openai_http import HttpServer, start_http
from plm.service.frontends.plm_v1 import AdminServicer, LanguageModelServicer
from plm.service.metrics import Metrics
from plm.service.registry import Registry
from plm.service.reload import Reloader
from plm.service.security import TokenAuth, server_credentials

from plm.api.triton import grpc_service_pb2_grpc
from plm.api.v1 import admin_pb2, admin_pb2_grpc, plm_pb2, plm_pb2_grpc

log = logging.getLogger("plm.server")

SERVICE_NAME = plm_pb2.DESCRIPTOR.services_by_name["LanguageModelService"].full_name
_CLOSE_SECONDS = 1.0  # after the drain: time for refusals being written and open health watches to end
# ...and before it: once nothing is in flight the port stays open until no call has been refused for this long
# (at most _QUIET_MAX_SECONDS), so a client whose next call was on its way when the last call in flight ended
# hears UNAVAILABLE from admission rather than CANCELLED from gRPC's own shutdown.
_QUIET_SECONDS = 0.25
_QUIET_MAX_SECONDS = 2.0
ADMIN_SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


def setup_logging(config: ServerConfig) -> None:
    logs.setup_logging(config.log_level, config.log_format, config.log_buffer_seconds)


@dataclass
class RunningServer:
    """A started server: what tests and `serve` hold on to."""

    server: grpc.aio.Server
    port: int
    registry: Registry
    metrics: Metrics
    health: health.aio.HealthServicer
    config: ServerConfig
    admission: Admission
    reloader: Reloader
    watcher: asyncio.Task[None] | None = None
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API; None when http_port is 0

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls with UNAVAILABLE, let calls in flight finish, then close."""
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING before the port closes
        self.admission.draining = True  # new calls: UNAVAILABLE; calls in flight go on
        if self.watcher is not None:
            self.watcher.cancel()
        until = time.monotonic() + (self.config.grace_seconds if grace is None else grace)
        # The port stays open while calls drain, so a late client hears a clear UNAVAILABLE from admission
        # (gRPC's own shutdown would cancel calls that arrive while it closes).
        while self.admission.inflight and time.monotonic() < until:
            await asyncio.sleep(0.02)
        idle = time.monotonic()  # the last call in flight ended (or the grace ran out)
        quiet_until = min(until, idle + _QUIET_MAX_SECONDS)
        while (now := time.monotonic()) < quiet_until and now - max(self.admission.last_refusal, idle) < _QUIET_SECONDS:
            await asyncio.sleep(0.02)
        # What is left: health watches and reflection streams (never admitted), and calls past the grace.
        if self.http is not None:
            await self.http.close()
        await self.server.stop(min(max(until - time.monotonic(), 0.0), _CLOSE_SECONDS))
        await self.reloader.close()
        for model in self.registry.models.values():
            await model.close()


def _connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """GOAWAY after max_connection_age_seconds; calls in flight then get grace_seconds before the close."""
    if config.max_connection_age_seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(config.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(config.grace_seconds * 1000))]


async def start_server(config: ServerConfig, metrics: Metrics | None = None) -> RunningServer:
    """Load every model, then bind and start. Returns once the server accepts calls."""
    metrics = metrics or Metrics()
    started = time.perf_counter()
    registry = Registry(config, metrics)
    await asyncio.to_thread(registry.load_all)
    try:
        for model in registry.models.values():
            await model.start()
        return await _bind_and_start(config, metrics, registry, started)
    except BaseException:  # a port in use, a bad certificate: the models' threads end with the failed start
        for model in registry.models.values():
            await model.close()
        raise


async def _bind_and_start(config: ServerConfig, metrics: Metrics, registry: Registry,
                          started: float) -> RunningServer:
    """The servers over loaded, started models: gRPC, then HTTP when asked for, then health SERVING."""
    credentials = server_credentials(config.security)
    tokens = config.security.tokens()
    interceptors = [TokenAuth(tokens, config.security.open_services, metrics)] if tokens else []
    if tokens and credentials is None and config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("bearer tokens over plaintext on %s: anyone on the path can read them; set TLS", config.host)
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", config.limits.max_message_bytes),
        ("grpc.max_send_message_length", config.limits.max_message_bytes),
        # Workers of one supervisor share the port; otherwise two servers on one port would split traffic silently.
        ("grpc.so_reuseport", int(config.reuse_port)),
        *_connection_age_options(config),
    ])
    admission = Admission(config.limits, metrics)
    health_servicer = health.aio.HealthServicer()
    reloader = Reloader(registry, health_servicer, config.grace_seconds)
    # One data plane under both protocols: each front end only translates its wire format.
    plane = DataPlane(registry, admission, metrics, config.limits, config.stream_interval)
    plm_pb2_grpc.add_LanguageModelServiceServicer_to_server(LanguageModelServicer(plane), server)
    kserve = KServeServicer(plane, reloader)  # KServe v2; its repository load and unload go through the reloader
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(kserve, server)
    admin = AdminServicer(plane, reloader, config)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, ADMIN_SERVICE_NAME, KSERVE_SERVICE_NAME,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    try:
        http = await start_http(plane, config) if config.http_port else None
    except BaseException:
        await server.stop(None)
        raise
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in registry.models:
        await health_servicer.set(name, serving)
    for name in registry.failed:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_servicer.set("", serving)
    await health_servicer.set(SERVICE_NAME, serving)
    await health_servicer.set(KSERVE_SERVICE_NAME, serving)
    watcher = None
    if config.reload_interval_seconds > 0:
        watcher = asyncio.get_running_loop().create_task(reloader.watch(config.reload_interval_seconds))
    log.info("serving %d model(s) [%s] on %s:%d%s in %.2fs (%s%s)", len(registry.models),
             ", ".join(registry.models), config.host, port,
             f", OpenAI-compatible HTTP on port {http.port}" if http is not None else "", time.perf_counter() - started,
             "mutual TLS" if config.security.tls_client_ca_file else "TLS" if credentials else "plaintext",
             f", {len(tokens)} bearer token(s)" if tokens else "")
    return RunningServer(server, port, registry, metrics, health_servicer, config, admission, reloader, watcher, http)


def run(config: ServerConfig) -> int:
    """`serve` to the end on uvloop's event loop where uvloop is installed (a dependency on Linux and macOS), else
    on asyncio's own: grpc.aio and aiohttp run on either, and uvloop's costs the event-loop thread less per call
    (benchmarks/grpc_floor.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, or until a server thread or batcher task dies, then drain gracefully.

    Returns the process's exit status: 0 after a signal, 1 after a death (service/faults.py).
    """
    metrics = Metrics()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port)
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    running = await start_server(config, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    deaths: list[str] = []

    def on_fatal(what: str) -> None:
        deaths.append(what)
        stop.set()

    unwatch = faults.watch(loop, on_fatal)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[Any]] = set()

    def reload_on_sighup() -> None:  # `kill -HUP`, or the supervisor of workers passing on a ReloadModels
        task = loop.create_task(running.reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_on_sighup)
    await stop.wait()
    log.info("shutting down: draining for up to %.1fs", config.grace_seconds)
    try:
        await running.stop()
    finally:
        unwatch()
    if deaths:
        log.critical("stopped after %s died", ", ".join(deaths))
        return 1
    log.info("stopped")
    return 0
