"""deploy/: the images' scripts run outside a container, the Dockerfiles and the entrypoint pass real linters
(hadolint, shellcheck), every kustomize overlay renders with the real `kubectl kustomize` and validates against
the Kubernetes schemas (kubernetes-validate) and the prometheus-operator CRD models (cloudcoil), and what the
manifests say about the server (probes, grace, env, metrics) is checked against the server's own code.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from plm.client.local_server import free_port
from plm.service.config import ServerConfig, load_config
from plm.service.metrics import Metrics
from plm.service.server import SERVICE_NAME

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc
from tests.conftest import ROOT, ServerThread, make_config

DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.gpu"]
OVERLAYS = ["cpu", "gpu"]
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships (offline)
PRESTOP_MARGIN_S = 5  # terminationGracePeriodSeconds = preStop sleep + grace_seconds + this
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def tool(name: str) -> str:
    """An outside tool: on PATH or beside this Python (the venv's bin). Missing in CI is a failure, not a skip."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (pyproject.toml's extras bring hadolint and shellcheck, .ci/run "
                        "prometheus and promtool; kubectl comes with the machine image)")
        pytest.skip(f"{name} is not installed")
    return found


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, env=env, timeout=timeout, check=False)


# ------------------------------------------------------------------------------------------------- images


def stages(dockerfile: Path) -> dict[str, dict[str, Any]]:
    """name -> {base, lines}: the Dockerfile's build stages, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text(encoding="utf-8"))
    out: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = out[m.group(2) or f"stage{len(out)}"] = {"base": m.group(1), "lines": []}
        elif current is not None:
            current["lines"].append(line)
    return out


def chain(all_stages: dict[str, dict[str, Any]], target: str) -> list[str]:
    """The target stage and the stages it is built FROM, nearest first."""
    names = [target]
    while all_stages[names[-1]]["base"] in all_stages:
        names.append(all_stages[names[-1]]["base"])
    return names


@pytest.mark.timeout(60)
def test_dockerfiles_pass_hadolint() -> None:
    hadolint = tool("hadolint")
    result = run(hadolint, *map(str, DOCKERFILES))
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter really lints: a known bad line is flagged (DL3007: the `latest` tag).
    bad = run(hadolint, "-", stdin="FROM ubuntu:latest\nRUN apt-get install -y curl\n")
    assert bad.returncode != 0 and "DL3007" in bad.stdout


@pytest.mark.timeout(60)
def test_entrypoint_passes_shellcheck() -> None:
    result = run(tool("shellcheck"), "--shell=sh", str(DEPLOY / "entrypoint.sh"))
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("dockerfile", "target"), [(DOCKERFILES[0], "cpu"), (DOCKERFILES[0], "bundled"),
                                                     (DOCKERFILES[1], "gpu")])
def test_image_is_runtime_only_non_root_with_healthcheck(dockerfile: Path, target: str) -> None:
    all_stages = stages(dockerfile)
    assert list(all_stages)[-1] == ("cpu" if target != "gpu" else "gpu")  # the default target is the lean one
    lines = [ln for name in reversed(chain(all_stages, target)) for ln in all_stages[name]["lines"]]
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")  # the last USER instruction wins
    assert any(ln.upper().startswith("HEALTHCHECK ") and "healthcheck.py" in ln for ln in lines)
    assert any(ln.upper().startswith("ENTRYPOINT ") and "entrypoint.sh" in ln for ln in lines)
    # No torch in the image: the training extra is installed only in the `models` stage, which an image
    # reaches through `COPY --from=models /models` at most (the repository, never its site-packages).
    assert not any("[build]" in ln or "torch" in ln for ln in lines)
    copied_from = {m.group(1): ln for ln in lines for m in [re.search(r"--from=(\S+)", ln)] if m}
    assert set(copied_from) <= {"venv", "models"}
    if "models" in copied_from:
        assert copied_from["models"].split()[-2:] == ["/models", "/models"]


SERVER_PORTS = {"grpc": ServerConfig().port, "http": ServerConfig().http_port, "metrics": ServerConfig().metrics_port}
PORT_ENV = {"grpc": "PLM_PORT", "http": "PLM_HTTP_PORT", "metrics": "PLM_METRICS_PORT"}


def image_env(lines: list[str]) -> dict[str, str]:
    """The ENV settings of a stage chain's lines (`ENV A=1 B=2`, continuation lines already joined)."""
    return {k: v for ln in lines if ln.upper().startswith("ENV ") for k, _, v in
            (pair.partition("=") for pair in ln.split()[1:])}


@pytest.mark.parametrize(("dockerfile", "target"), [(DOCKERFILES[0], "cpu"), (DOCKERFILES[1], "gpu")])
def test_image_sets_and_exposes_every_port_the_server_listens_on(dockerfile: Path, target: str) -> None:
    """gRPC, the OpenAI-compatible HTTP API and /metrics: each set by its PLM_* variable to the server's default
    and EXPOSEd, and nothing else exposed (a port added to the server but not to the image fails here)."""
    all_stages = stages(dockerfile)
    lines = [ln for name in reversed(chain(all_stages, target)) for ln in all_stages[name]["lines"]]
    env = image_env(lines)
    assert {name: int(env[var]) for name, var in PORT_ENV.items()} == SERVER_PORTS
    exposed = [int(p.split("/")[0]) for ln in lines if ln.upper().startswith("EXPOSE ") for p in ln.split()[1:]]
    assert sorted(exposed) == sorted(SERVER_PORTS.values())


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides (`!` re-includes)."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        regex = re.escape(pat).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_images_copy_and_nothing_heavy() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = set()
    for dockerfile in DOCKERFILES:
        for st in stages(dockerfile).values():
            for ln in st["lines"]:
                if ln.upper().startswith("COPY ") and "--from=" not in ln:
                    sources.update(a for a in ln.split()[1:-1] if not a.startswith("--"))
    assert {"protos/", "service/", "deploy/entrypoint.sh", "pyproject.toml"} <= sources
    for src in sorted(sources):
        assert (ROOT / src).exists(), src
        assert not dockerignored(src, patterns), f"{src} is COPYed but .dockerignore leaves it out"
        tracked = run("git", "-C", str(ROOT), "ls-files", src).stdout.split()
        assert tracked, src
        for path in tracked:  # every committed file inside a COPYed folder reaches the build too
            assert not dockerignored(path, patterns), path
    for heavy in (".venv/bin/python", ".git/HEAD", "repository/gpt/model.onnx", "cache/corpus.txt",
                  "plm/api/v1/plm_pb2.py", "service/__pycache__/x.pyc", "tests/test_deploy.py"):
        assert dockerignored(heavy, patterns), heavy


# -------------------------------------------------------------------------------- entrypoint + healthcheck


def script_env(**env: str) -> dict[str, str]:
    """The environment of the container, outside it: `plm` from this venv, the worktree's code, PLM_* as given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLM_")}
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    base["PYTHONPATH"] = str(ROOT)
    return base | env


def healthcheck(target: str, service: str = "") -> subprocess.CompletedProcess[str]:
    return run(sys.executable, str(DEPLOY / "healthcheck.py"), *([service] if service else []),
               env=script_env(PLM_HEALTH_TARGET=target, PLM_HEALTH_TIMEOUT="2"), timeout=30)


@pytest.mark.timeout(30)
def test_entrypoint_refuses_a_missing_or_empty_repository(tmp_path: Path) -> None:
    entry = str(DEPLOY / "entrypoint.sh")
    missing = run(entry, env=script_env(PLM_REPOSITORY=str(tmp_path / "nowhere")))
    assert missing.returncode == 66 and str(tmp_path / "nowhere") in missing.stderr and "mount" in missing.stderr
    empty = run(entry, env=script_env(PLM_REPOSITORY=str(tmp_path)))
    assert empty.returncode == 66 and "manifest.json" in empty.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text("{}")
    no_config = run(entry, env=script_env(PLM_REPOSITORY=str(tmp_path), PLM_CONFIG=str(tmp_path / "x.toml")))
    assert no_config.returncode == 66 and "x.toml" in no_config.stderr
    # A command instead of flags runs that command (`docker run IMAGE plm client health`).
    assert run(entry, "echo", "hello", env=script_env()).stdout == "hello\n"


@pytest.mark.timeout(120)
def test_entrypoint_serves_with_the_k8s_config_and_drains_on_sigterm(tiny_repo: Path) -> None:
    """The script execs `plm serve` with the ConfigMap's TOML: health and /metrics answer, SIGTERM stops it cleanly."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    env = script_env(PLM_REPOSITORY=str(tiny_repo), PLM_HOST="127.0.0.1", PLM_PORT=str(port),
                     PLM_METRICS_PORT=str(metrics_port), PLM_HTTP_PORT=str(http_port), PLM_MODELS="ngram-kn",
                     PLM_CONFIG=str(DEPLOY / "k8s" / "base" / "plm.toml"))
    target = f"127.0.0.1:{port}"
    proc = subprocess.Popen([str(DEPLOY / "entrypoint.sh")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90  # start-up of one tiny model; generous for a loaded 2-core machine
        while (check := healthcheck(target)).returncode != 0:
            assert proc.poll() is None, f"the server exited: {proc.communicate()[0]}"
            assert time.monotonic() < deadline, check.stderr
            time.sleep(0.5)
        assert "SERVING" in check.stdout
        assert healthcheck(target, SERVICE_NAME).returncode == 0
        assert healthcheck(target, "ngram-kn").returncode == 0
        unknown = healthcheck(target, "no-such-model")
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert 'plm_model_ready{model="ngram-kn"} 1.0' in resp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as resp:
            assert json.loads(resp.read()) == {"status": "SERVING"}
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["ngram-kn"]
        proc.send_signal(signal.SIGTERM)  # to the script's PID: only an exec'd server receives it
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "draining" in out and "stopped" in out
    gone = healthcheck(target)
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr


# ------------------------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """overlay -> its manifests, rendered by the real kustomize inside kubectl."""
    kubectl = tool("kubectl")
    out = {}
    for overlay in OVERLAYS:
        result = run(kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
        assert result.returncode == 0, result.stderr
        out[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return out


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def validate_crd(doc: dict[str, Any]) -> None:
    """Against cloudcoil's models of the prometheus-operator CRDs: types and patterns from the CRD schema, and
    (the models ignore unknown keys) a round trip that must keep every key, so a misspelt field fails too."""
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, doc["kind"]).model_validate(doc)
    back = model.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert back == doc, f"{doc['kind']}: fields the CRD does not define were dropped"


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    if doc["kind"] in CRD_KINDS:
        validate_crd(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_validate_against_the_schemas(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                            "NetworkPolicy", "PodDisruptionBudget", "PrometheusRule", "Service", "Service",
                            "ServiceMonitor"])
    for doc in docs:
        validate(doc)


def test_the_validators_reject_a_misspelt_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    deployment = copy.deepcopy(one(rendered["cpu"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    monitor = copy.deepcopy(one(rendered["cpu"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="dropped"):
        validate(monitor)
    monitor["spec"]["endpoints"][0] = {"port": "metrics", "interval": "fifteen seconds"}
    with pytest.raises(ValueError, match="pattern"):  # pydantic's ValidationError is a ValueError
        validate(monitor)


def container_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]  # type: ignore[no-any-return]


def server_config(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[ServerConfig, dict[str, str]]:
    """The config the pod's server builds: the ConfigMap's plm.toml read by service/config.py, then the env."""
    (toml,) = one(docs, "ConfigMap")["data"].values()
    path = tmp_path / "plm.toml"
    path.write_text(toml)
    env = {e["name"]: e["value"] for e in container_of(docs).get("env", [])}
    assert env["PLM_CONFIG"] == "/etc/plm/plm.toml"
    return load_config(path, environ={k: v for k, v in env.items() if k != "PLM_CONFIG"}), env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_grace_and_settings_match_the_server(rendered: dict[str, list[dict[str, Any]]], overlay: str,
                                                    tmp_path: Path) -> None:
    docs = rendered[overlay]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container_of(docs)
    config, env = server_config(docs, tmp_path)
    for name, value in env.items():  # every PLM_* variable is a setting the server knows (it ignores others)
        if name != "PLM_CONFIG":
            assert load_config(environ={name: value}) != ServerConfig(), f"{name} is not a server setting"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == SERVER_PORTS  # the image's PLM_PORT, PLM_HTTP_PORT, PLM_METRICS_PORT
    assert c["startupProbe"]["grpc"] == c["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": ""}
    assert c["readinessProbe"]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}
    # The drain fits: preStop sleep, then the server's own grace, inside the pod's termination grace.
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == sleep + config.grace_seconds + PRESTOP_MARGIN_S
    assert config.max_connection_age_seconds > 0
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    assert mounts["config"]["mountPath"] == "/etc/plm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]  # hashed name
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == one(docs, "PersistentVolumeClaim")[
        "metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpu == "1") == (overlay == "gpu")
    assert ("CUDAExecutionProvider" in config.runtime.providers) == (overlay == "gpu")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_autoscaler_budget_and_monitor_find_the_pods(rendered: dict[str, list[dict[str, Any]]],
                                                             overlay: str) -> None:
    docs = rendered[overlay]
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    c = container_of(docs)
    container_ports = {p["name"] for p in c["ports"]}
    services = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service"}
    assert services["plm-headless"]["spec"]["clusterIP"] == "None"
    assert services["plm"]["spec"].get("clusterIP") in (None, "") and services["plm"]["spec"]["type"] == "ClusterIP"
    for svc in services.values():
        assert selects(svc["spec"]["selector"], pod_labels)
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
        for p in svc["spec"]["ports"]:  # the Service's port is the container's: clients use the documented ports
            assert p["port"] == SERVER_PORTS[p["targetPort"]] and p["name"] == p["targetPort"]
    # The ClusterIP Service carries every port the server serves; the headless one only gRPC (its reason to be:
    # client-side round-robin for HTTP/2 channels).
    assert {p["name"] for p in services["plm"]["spec"]["ports"]} == container_ports == set(SERVER_PORTS)
    assert {p["name"] for p in services["plm-headless"]["spec"]["ports"]} == {"grpc"}
    # The NetworkPolicy admits exactly the container's ports to exactly these pods.
    policy = one(docs, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels) and policy["policyTypes"] == ["Ingress"]
    allowed = [p["port"] for rule in policy["ingress"] for p in rule["ports"]]
    assert sorted(allowed) == sorted(container_ports)
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    # The ServiceMonitor scrapes the one Service that has the metrics port.
    monitor = one(docs, "ServiceMonitor")["spec"]
    scraped = [s for s in services.values() if selects(monitor["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in scraped] == ["plm"]
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in scraped[0]["spec"]["ports"]}
    # The autoscaler: the Deployment, on CPU (not for GPUs) and on queue depth served by the adapter rule.
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "plm"}
    assert hpa["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, a drain never takes the last replica
    by_type = {m["type"]: m for m in hpa["metrics"]}
    assert ("Resource" in by_type) == (overlay == "cpu")
    assert "cpu" in c["resources"]["requests"]  # utilisation is relative to the request
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())["rules"]
    served = {r["name"]["as"]: re.match(r"\w+", r["seriesQuery"]).group(0) for r in adapter}  # type: ignore[union-attr]
    metric = by_type["Pods"]["pods"]["metric"]["name"]
    exposed = {m.name for m in Metrics().registry.collect()}
    assert metric in served and served[metric] in exposed


# ------------------------------------------------------------------------------------ max connection age


def goes_idle(target: str, within: float) -> bool:
    """Whether a channel that made one call drops from READY to IDLE by itself (a GOAWAY) within this long."""
    with grpc.insecure_channel(target) as channel:
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=False)
        stub = plm_pb2_grpc.LanguageModelServiceStub(channel)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            ready = [i for i, st in enumerate(states) if st == grpc.ChannelConnectivity.READY]
            if ready and grpc.ChannelConnectivity.IDLE in states[ready[0]:]:
                assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models  # reconnects transparently
                return True
            time.sleep(0.1)
    return False


@pytest.mark.timeout(90)
def test_max_connection_age_closes_connections_and_clients_reconnect(tiny_repo: Path) -> None:
    """With the age set the server sends GOAWAY and the client's next call reconnects; without it, it does not."""
    aged = ServerThread(make_config(tiny_repo, models=("ngram-kn",), max_connection_age_seconds=0.5,
                                    grace_seconds=0.5))
    try:
        assert goes_idle(aged.target, within=20)  # age 0.5 s (± 10 % jitter) + 0.5 s grace; generous when loaded
    finally:
        aged.stop()
    default = ServerThread(make_config(tiny_repo, models=("ngram-kn",)))
    try:
        assert not goes_idle(default.target, within=3)  # the control: 3 s is several ages of the server above
    finally:
        default.stop()
