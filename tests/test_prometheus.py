"""Prometheus and Grafana against the real tools: the `prometheus` server (Debian package) scrapes a real plm
server's /metrics; promtool checks that exposition and the alert rules and unit-tests every alert; each PromQL
expression of the Grafana dashboard and of the autoscaler's adapter rule runs in that Prometheus and names only
metrics the server exposes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from plm.client.local_server import free_port
from prometheus_client.parser import text_string_to_metric_families

from plm.api.v1 import plm_pb2 as pb
from plm.api.v1 import plm_pb2_grpc
from tests.conftest import ServerThread, make_config
from tests.test_deploy import DEPLOY, run, tool

RULES = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts-test.yml"
DASHBOARD = DEPLOY / "grafana" / "plm-dashboard.json"
ADAPTER = DEPLOY / "prometheus" / "adapter-rules.yaml"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}


def drive(target: str) -> None:
    """Traffic that touches every metric family: batched scoring, generation (unary, streamed), few-shot
    classification (prefix cache) and two kinds of caller error."""
    with grpc.insecure_channel(target) as channel:
        stub = plm_pb2_grpc.LanguageModelServiceStub(channel)
        stub.Score(pb.ScoreRequest(model="ngram-kn", texts=["the king is dead .", "to be or not to be"]), timeout=60)
        stub.Score(pb.ScoreRequest(model="gpt", texts=["the king", "what light through yonder window breaks"]),
                   timeout=60)
        sampling = pb.SamplingParams(max_new_tokens=4, temperature=0.0)
        stub.Generate(pb.GenerateRequest(model="gpt", prompts=["the king", "my lord"], sampling=sampling), timeout=60)
        for _ in stub.GenerateStream(pb.GenerateRequest(model="gpt", prompts=["the queen"], sampling=sampling),
                                     timeout=60):
            pass
        demos = [pb.Demonstration(text="the king is dead", label="sad"), pb.Demonstration(text="joy", label="happy")]
        for _ in range(2):  # the second call finds the demonstrations' prefix cached
            stub.Classify(pb.ClassifyRequest(model="gpt", demonstrations=demos, queries=["a merry day"],
                                             labels=["sad", "happy"]), timeout=60)
        for bad in (pb.ScoreRequest(model="no-such-model", texts=["x"]), pb.ScoreRequest(model="ngram-kn")):
            with pytest.raises(grpc.RpcError):
                stub.Score(bad, timeout=60)


class Plm:
    def __init__(self, server: ServerThread, metrics_url: str) -> None:
        self.server, self.metrics_url = server, metrics_url

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    def value(self, name: str, **labels: str) -> float:
        """One series' value on plm's /metrics (0 when absent)."""
        for family in text_string_to_metric_families(self.scrape()):
            for s in family.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    def names(self) -> tuple[set[str], set[str]]:
        """(series names that have samples, every series name the exposition declares) of plm's /metrics."""
        sampled, declared = set(), set()
        for family in text_string_to_metric_families(self.scrape()):
            sampled.update(s.name for s in family.samples)
            declared.update(family.name + suffix for suffix in SUFFIXES[family.type])
        return sampled, declared


@pytest.fixture(scope="module")
def plm(tiny_repo: Path) -> Iterator[Plm]:
    """A real server with /metrics on its own port, after traffic."""
    srv = ServerThread(make_config(tiny_repo, models=("ngram-kn", "gpt")))
    port = free_port()
    srv.running.metrics.serve_http("127.0.0.1", port)  # as `plm serve` does, on a free port
    drive(srv.target)
    yield Plm(srv, f"http://127.0.0.1:{port}/metrics")
    srv.stop()


def rules_file(folder: Path) -> Path:
    """The PrometheusRule's spec as a plain Prometheus rules file (what the operator hands to Prometheus)."""
    path = folder / "plm-rules.yml"
    path.write_text(yaml.safe_dump(yaml.safe_load(RULES.read_text())["spec"], sort_keys=False))
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=promql)["result"]  # type: ignore[no-any-return]

    def wait(self, what: str, ok: Any, seconds: float = 60) -> Any:
        """Poll until ok() is truthy (scrapes and rule evaluations run every second here)."""
        deadline = time.monotonic() + seconds
        while not (value := ok()):
            assert time.monotonic() < deadline, f"Prometheus: still no {what} after {seconds} s"
            time.sleep(0.5)
        return value


@pytest.fixture(scope="module")
def prometheus(plm: Plm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """The real Prometheus server scraping plm every second, with our alert rules loaded."""
    binary = tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    host_port = plm.metrics_url.split("/")[2]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(rules_file(folder))],
              "scrape_configs": [{"job_name": "plm", "static_configs": [{"targets": [host_port]}]}]}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200  # type: ignore[no-any-return]
            except OSError:
                return False

        prom.wait("readiness", ready)
        prom.wait("scrape of plm", lambda: prom.query('up{job="plm"} == 1'))
        yield prom
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.timeout(120)
def test_promtool_check_metrics_is_clean_on_our_exposition(plm: Plm) -> None:
    text = plm.scrape()
    # The traffic reached the metrics: drive()'s three prompts each took at least one step, at most four.
    assert 3 <= plm.value("plm_generated_tokens_total", model="gpt") <= 12
    result = run(tool("promtool"), "check", "metrics", stdin=text)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    # The checker really checks: a counter without _total is flagged.
    bad = run(tool("promtool"), "check", "metrics", stdin="# HELP x_count a\n# TYPE x_count counter\nx_count 1\n")
    assert bad.returncode != 0 and "_total" in bad.stdout + bad.stderr


def test_exposition_has_no_created_series(plm: Plm) -> None:
    """prometheus_client's `_created` series are off (service/metrics.py): none beside any counter or histogram."""
    text = plm.scrape()
    score = {"method": "Score", "model": "gpt", "protocol": "grpc"}
    assert plm.value("plm_requests_total", code="OK", **score) == 1  # drive()'s one Score call on gpt
    assert plm.value("plm_request_duration_seconds_count", **score) == 1
    assert [line for line in text.splitlines() if "_created" in line] == []


@pytest.mark.timeout(120)
def test_prometheus_scrapes_every_plm_series(plm: Plm, prometheus: Prometheus) -> None:
    sampled, _ = plm.names()
    assert len(sampled) > 30 and all(name.startswith("plm_") for name in sampled)

    def scraped() -> set[str]:
        names = set(prometheus.get("/api/v1/label/__name__/values"))
        return names if sampled <= names else set()

    prometheus.wait("plm series", scraped)
    ready = {r["metric"]["model"]: r["value"][1] for r in prometheus.query('plm_model_ready{job="plm"}')}
    assert ready == {"ngram-kn": "1", "gpt": "1"}
    codes = {r["metric"]["code"] for r in prometheus.query("sum by (code) (plm_requests_total)")}
    assert {"OK", "NOT_FOUND", "INVALID_ARGUMENT"} <= codes
    # What Prometheus stored is what the server exposes (the traffic is over, the counters stand still).
    exposed = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(plm.scrape()) for s in f.samples
               if s.name in ("plm_requests_total", "plm_generated_tokens_total", "plm_batch_size_count")}
    stored = {(r["metric"].pop("__name__"), tuple(sorted((k, v) for k, v in r["metric"].items()
                                                        if k not in ("job", "instance")))): float(r["value"][1])
              for r in prometheus.query('{__name__=~"plm_requests_total|plm_generated_tokens_total|'
                                        'plm_batch_size_count"}')}
    assert stored == exposed and len(exposed) > 5
    assert exposed[("plm_generated_tokens_total", (("model", "gpt"),))] > 0


@pytest.mark.timeout(120)
def test_alert_rules_pass_promtool_and_run_in_prometheus(prometheus: Prometheus, tmp_path: Path) -> None:
    promtool = tool("promtool")
    check = run(promtool, "check", "rules", str(rules_file(tmp_path)))
    assert check.returncode == 0 and "SUCCESS: 4 rules found" in check.stdout, check.stdout + check.stderr
    alerts = {"PlmHighErrorRate", "PlmQueueSaturated", "PlmP99LatencyHigh", "PlmModelNotReady"}

    def evaluated() -> dict[str, Any]:
        (group,) = prometheus.get("/api/v1/rules")["groups"]
        rules = {r["name"]: r for r in group["rules"]}
        return rules if all(r.get("lastEvaluation", "0001").startswith("20") for r in rules.values()) else {}

    rules = prometheus.wait("rule evaluation", evaluated)
    assert set(rules) == alerts
    assert {name: r["health"] for name, r in rules.items()} == dict.fromkeys(alerts, "ok")
    # A healthy server trips none of them (all models ready, no server errors, short queues).
    assert all(r["state"] == "inactive" for r in rules.values()), rules


@pytest.mark.timeout(120)
def test_alert_unit_tests_pass_and_can_fail(tmp_path: Path) -> None:
    promtool = tool("promtool")
    rules_file(tmp_path)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = run(promtool, "test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode == 0, result.stdout + result.stderr
    # The same unit tests against a rule that never fires must fail.
    broken = (tmp_path / "plm-rules.yml").read_text().replace("plm_model_ready == 0", "plm_model_ready == 2")
    (tmp_path / "plm-rules.yml").write_text(broken)
    failed = run(promtool, "test", "rules", str(tmp_path / RULE_TESTS.name))
    assert failed.returncode != 0 and "PlmModelNotReady" in failed.stdout + failed.stderr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and of the `model` variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    out += [(f"${v['name']}", v["query"]["query"]) for v in dash["templating"]["list"] if v["type"] == "query"]
    return out


def instantiate(expr: str) -> str:
    """Grafana's variables as Grafana fills them in: all models, a rate window of several scrapes."""
    expr = expr.replace("$__rate_interval", "30s").replace("$model", ".*")
    m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", expr)  # Grafana's helper, not PromQL
    return f"count by ({m.group(2)}) ({m.group(1)})" if m else expr


def test_dashboard_covers_what_operators_ask_for() -> None:
    dash = json.loads(DASHBOARD.read_text())
    text = " ".join(f"{p['title']} {p.get('description', '')}" for p in dash["panels"]).lower()
    for topic in ("requests / s", "latency", "batch size", "padding efficiency", "tokens / s", "errors",
                  "queue depth", "time to first token", "model ready"):
        assert topic in text, topic
    ids = [p["id"] for p in dash["panels"]]
    assert len(set(ids)) == len(ids)
    for p in dash["panels"]:  # panels sit on Grafana's 24-column grid without overlapping
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
    cells = [(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in dash["panels"]
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells))


def dropped(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where `ours` has a key or value that `theirs` (a schema round trip of it) lost or changed."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [path]
        return [p for k, v in ours.items() for p in (dropped(v, theirs[k], f"{path}/{k}") if k in theirs
                                                      else [f"{path}/{k}"])]
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [path]
        return [p for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for p in dropped(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} became {theirs!r}"]


def grafana_round_trip(data: dict[str, Any]) -> Any:
    """The dashboard as Grafana's own types (grafana-foundation-sdk, generated from Grafana's schemas) read it
    and write it back."""
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.models import dashboard

    plugins.register_default_plugins()  # panel options and Prometheus queries decode through their plugins
    written = dashboard.Dashboard.from_json(data).to_json()
    return json.loads(json.dumps(written, default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)))


def test_dashboard_fits_grafanas_schema() -> None:
    """A key Grafana's types lose is one Grafana does not know (a typo, or a field of another version)."""
    ours = json.loads(DASHBOARD.read_text())
    assert dropped(ours, grafana_round_trip(ours)) == []
    ours["panels"][1]["gridpos"] = ours["panels"][1].pop("gridPos")  # the check can fail
    assert dropped(ours, grafana_round_trip(ours)) == ["/panels[1]/gridpos"]


@pytest.mark.timeout(120)
def test_dashboard_queries_run_in_prometheus_on_real_metrics(plm: Plm, prometheus: Prometheus) -> None:
    sampled, declared = plm.names()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        names = set(re.findall(r"\bplm_\w+", expr))
        assert names, f"{title}: no plm_ metric in {expr}"
        assert names <= declared, f"{title}: {names - declared} is not in the server's /metrics"
        if not names <= sampled:  # a family with no samples yet (no rejection happened): parse check only
            prometheus.query(instantiate(expr))
            continue
        # Once the server's series are in, every panel over them shows something.
        prometheus.wait(f"data for panel {title!r}: {instantiate(expr)}",
                        lambda e=expr: prometheus.query(instantiate(e)))  # type: ignore[misc]


@pytest.mark.timeout(120)
def test_adapter_rule_serves_the_autoscaler_metric(plm: Plm, prometheus: Prometheus) -> None:
    (rule,) = yaml.safe_load(ADAPTER.read_text())["rules"]
    series = re.match(r"\w+", rule["seriesQuery"]).group(0)  # type: ignore[union-attr]
    sampled, _ = plm.names()
    assert series in sampled
    # The adapter's template as it fills it for one pod's request; here the scrape job stands in for the pod.
    query = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'job="plm"')
             .replace("<<.GroupBy>>", "job"))
    (result,) = prometheus.query(query)
    assert result["metric"] == {"job": "plm"} and float(result["value"][1]) >= 0
