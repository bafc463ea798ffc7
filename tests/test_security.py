"""TLS, mutual TLS and bearer-token auth over real gRPC, with certificates generated here (cryptography);
and the repository's path safety: names and manifests can never reach outside the repository folder."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from plm.service.config import Security, load_config

from plm.api.v1 import admin_pb2, admin_pb2_grpc
from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

SCORE = pb.ScoreRequest(model="ngram-kn", texts=["the king is dead"])


@dataclass
class Pem:
    cert: bytes
    key: bytes


def _issue(name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, ca: bool = False,
           server: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _pem(pair: tuple[x509.Certificate, ec.EllipticCurvePrivateKey]) -> Pem:
    cert, key = pair
    return Pem(cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@dataclass
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by a CA the server does not trust
    folder: Path

    def write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = _issue("plm test CA", None, ca=True)
    rogue_ca = _issue("rogue CA", None, ca=True)
    return Pki(_pem(ca), _pem(_issue("localhost", ca, server=True)), _pem(_issue("client", ca)),
               _pem(_issue("client", rogue_ca)), tmp_path_factory.mktemp("pki"))


def _serve(repo: Path, security: Security) -> ServerThread:
    return ServerThread(make_config(repo, models=("ngram-kn",), security=security))


@pytest.fixture(scope="module")
def mtls_server(tiny_repo: Path, pki: Pki) -> Iterator[ServerThread]:
    srv = _serve(tiny_repo, Security(tls_cert_file=pki.write("server.pem", pki.server.cert),
                                     tls_key_file=pki.write("server.key", pki.server.key),
                                     tls_client_ca_file=pki.write("ca.pem", pki.ca.cert)))
    yield srv
    srv.stop()


def _score(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        pb_grpc.LanguageModelServiceStub(channel).Score(SCORE, timeout=10, metadata=metadata)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _tls(target: str, root: bytes, client: Pem | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root, client.key if client else None, client.cert if client else None)
    return grpc.secure_channel(target, creds)


def test_tls_serves_only_with_a_trusted_server_certificate(tiny_repo: Path, pki: Pki) -> None:
    srv = _serve(tiny_repo, Security(tls_cert_file=pki.write("s.pem", pki.server.cert),
                                     tls_key_file=pki.write("s.key", pki.server.key)))
    try:
        with _tls(srv.target, pki.ca.cert) as ch:
            assert _score(ch) == grpc.StatusCode.OK
        with grpc.insecure_channel(srv.target) as ch:  # plaintext to a TLS port: no handshake, no call
            assert _score(ch) == grpc.StatusCode.UNAVAILABLE
        with _tls(srv.target, pki.rogue_client.cert) as ch:  # a client that trusts another CA refuses the server
            assert _score(ch) == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(mtls_server: ServerThread, pki: Pki) -> None:
    with _tls(mtls_server.target, pki.ca.cert, pki.client) as ch:
        assert _score(ch) == grpc.StatusCode.OK
    with _tls(mtls_server.target, pki.ca.cert) as ch:  # no client certificate
        assert _score(ch) == grpc.StatusCode.UNAVAILABLE
    with _tls(mtls_server.target, pki.ca.cert, pki.rogue_client) as ch:  # a certificate the server's CA did not sign
        assert _score(ch) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked_at_start(tiny_repo: Path, pki: Pki) -> None:
    cert = pki.write("only.pem", pki.server.cert)
    for security, needle in ((Security(tls_cert_file=cert), "both"),
                             (Security(tls_client_ca_file=cert), "mutual TLS is TLS"),
                             (Security(tls_cert_file=cert, tls_key_file=pki.folder / "missing.key"), "missing.key")):
        with pytest.raises(ValueError, match=needle):
            _serve(tiny_repo, security)


@pytest.fixture(scope="module")
def auth_server(tiny_repo: Path, pki: Pki) -> Iterator[ServerThread]:
    tokens = pki.write("tokens.txt", b"# operators\nfirst-token\n\n  second-token  \n")
    srv = _serve(tiny_repo, Security(auth_tokens_file=tokens))
    yield srv
    srv.stop()


def test_bearer_token_auth(auth_server: ServerThread) -> None:
    with grpc.insecure_channel(auth_server.target) as ch:
        assert _score(ch) == grpc.StatusCode.UNAUTHENTICATED
        assert _score(ch, (("authorization", "Bearer wrong-token"),)) == grpc.StatusCode.UNAUTHENTICATED
        assert _score(ch, (("authorization", "first-token"),)) == grpc.StatusCode.UNAUTHENTICATED  # no scheme
        assert _score(ch, (("authorization", "Bearer first-token"),)) == grpc.StatusCode.OK
        assert _score(ch, (("authorization", "bearer second-token"),)) == grpc.StatusCode.OK
        stream = pb_grpc.LanguageModelServiceStub(ch).GenerateStream(
            pb.GenerateRequest(model="ngram-kn", prompts=["the"]), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # the admin service is never open
            admin_pb2_grpc.AdminServiceStub(ch).ReloadModels(admin_pb2.ReloadModelsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes carry no token: health (and reflection) are open by default.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    text = auth_server.running.metrics.exposition().decode()
    assert 'plm_rejections_total{model="-",reason="unauthenticated"} 5.0' in text


def test_open_services_are_configurable(tiny_repo: Path, pki: Pki) -> None:
    srv = _serve(tiny_repo, Security(auth_token="only-token", open_services=()))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=10,
                            metadata=(("authorization", "Bearer only-token"),))
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_security_settings_load_from_file_env_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "plm.toml"
    toml.write_text('[security]\ntls_cert_file = "/certs/server.pem"\nopen_services = ["grpc.health.v1.Health"]\n'
                    '[limits]\nmax_inflight_requests = 7\n')
    env = {"PLM_SECURITY__TLS_KEY_FILE": "/certs/server.key", "PLM_SECURITY__AUTH_TOKENS_FILE": "",
           "PLM_SECURITY__AUTH_TOKEN": "t0k"}
    cfg = load_config(toml, {"security": {"tls_client_ca_file": "/certs/ca.pem"}}, environ=env)
    assert cfg.security == Security(tls_cert_file=Path("/certs/server.pem"), tls_key_file=Path("/certs/server.key"),
                                    tls_client_ca_file=Path("/certs/ca.pem"), auth_token="t0k",
                                    open_services=("grpc.health.v1.Health",))
    assert cfg.limits.max_inflight_requests == 7


# --------------------------------------------------------------------------------------------- path safety


def test_model_names_and_manifests_never_leave_the_repository(tiny_repo: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "ngram-kn", repo / "ngram-kn")
    (tmp_path / "secret.arpa").write_text("outside the repository\n")
    for name, change in (("evil-arpa", {"ngram": {"file": "../../secret.arpa"}}),
                         ("evil-tok", {"tokenizer": {"file": "/etc/passwd"}}),
                         ("evil-pickle", {"family": "pickle"})):
        shutil.copytree(tiny_repo / "ngram-kn", repo / name)
        manifest = json.loads((repo / name / "manifest.json").read_text())
        # Only the named key changes, so the path check, not the manifest's schema, is what refuses the model.
        for key, value in change.items():
            manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
        manifest["name"] = name
        (repo / name / "manifest.json").write_text(json.dumps(manifest))
    srv = ServerThread(make_config(repo))
    try:
        assert set(srv.running.registry.models) == {"ngram-kn"}
        failed = srv.running.registry.failed
        assert "not a file inside the model folder" in failed["evil-arpa"]
        assert "not a file inside the model folder" in failed["evil-tok"]
        assert "unknown family 'pickle'" in failed["evil-pickle"]
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.LanguageModelServiceStub(ch)
            for name in ("../ngram-kn", "ngram-kn/../ngram-kn", "/etc/passwd", "..", "evil-arpa"):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Score(pb.ScoreRequest(model=name, texts=["the king"]), timeout=10)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


def test_plm_client_speaks_mutual_tls_and_tokens(tiny_repo: Path, pki: Pki, capsys: pytest.CaptureFixture[str],
                                                auth_server: ServerThread) -> None:
    from plm.cli import main

    srv = _serve(tiny_repo, Security(tls_cert_file=pki.write("m.pem", pki.server.cert),
                                     tls_key_file=pki.write("m.key", pki.server.key),
                                     tls_client_ca_file=pki.write("mca.pem", pki.ca.cert), auth_token="tls-token"))
    try:
        tls = ["--target", srv.target, "--tls-ca", str(pki.folder / "mca.pem"), "--tls-cert",
               str(pki.write("c.pem", pki.client.cert)), "--tls-key", str(pki.write("c.key", pki.client.key))]
        assert main(["client", *tls, "--token", "tls-token", "models"]) == 0
        assert "ngram-kn" in capsys.readouterr().out
        assert main(["client", *tls, "models"]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["client", *tls, "--token", "tls-token", "reload"]) == 0
        out = capsys.readouterr().out
        assert "ngram-kn" in out and "unchanged" in out
    finally:
        srv.stop()
    # Without TLS a token goes only to a loopback server (gRPC's local credentials).
    assert main(["client", "--target", auth_server.target, "--token", "second-token", "score", "ngram-kn",
                 "the king"]) == 0
    assert "log_prob=" in capsys.readouterr().out


def test_plm_serve_flags_reach_the_config() -> None:
    from plm.cli import _build_parser, serve_config

    args = _build_parser().parse_args(["serve", "--tls-cert", "s.pem", "--tls-key", "s.key", "--tls-client-ca",
                                       "ca.pem", "--auth-tokens-file", "tokens.txt", "--grace-seconds", "3",
                                       "--reload-interval", "2"])
    cfg = serve_config(args)
    assert cfg.security == Security(tls_cert_file=Path("s.pem"), tls_key_file=Path("s.key"),
                                    tls_client_ca_file=Path("ca.pem"), auth_tokens_file=Path("tokens.txt"))
    assert (cfg.grace_seconds, cfg.reload_interval_seconds) == (3.0, 2.0)
