"""`plm loadtest`: the drivers against the real tiny server, and the pure parts (scenario, percentiles, /metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plm.client import loadtest as lt
from plm.client.local_server import free_port

from plm.cli import main as plm_main
from tests.conftest import ServerThread, make_config

MIXED = {"requests": [
    {"weight": 3, "rpc": "Score", "model": "ngram-kn"},
    {"weight": 1, "rpc": "PredictNext", "model": "gpt", "top_k": 5},
    {"weight": 1, "rpc": "Generate", "model": "gpt", "max_new_tokens": 4, "temperature": 0},
    {"weight": 1, "rpc": "FillMask", "model": "bert"},
    {"weight": 1, "rpc": "Embed", "model": "word2vec-skipgram"},
]}


def _config(targets: list[str], scenario: dict[str, object], **kw: object) -> lt.LoadConfig:
    return lt.LoadConfig(targets=tuple(targets), specs=tuple(lt.parse_scenario(scenario)),
                         inputs=lt.BUILTIN_INPUTS, **kw)  # type: ignore[arg-type]


def test_closed_loop_mixed_scenario_writes_report(server: ServerThread, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "mixed.json"
    scenario.write_text(json.dumps(MIXED))
    out = tmp_path / "run.json"
    rc = plm_main(["loadtest", "--target", server.target, "--scenario", str(scenario), "--concurrency", "4",
                   "--duration", "2", "--warmup", "0.5", "--out", str(out), "--quiet"])
    assert rc == 0
    assert "throughput" in capsys.readouterr().out
    result = json.loads(out.read_text())
    s = result["summary"]
    assert s["requests"] > 20 and s["ok"] == s["requests"] and s["errors"] == {}
    counts = {rpc: r["requests"] for rpc, r in s["by_rpc"].items()}
    assert set(counts) == {"Score", "PredictNext", "Generate", "FillMask", "Embed"}
    # Weights 3:1:1:1:1 → Score ≈ 3/7 of requests (each request draws its kind by weight); a few dozen requests
    # only, so loose bounds.
    assert 0.2 < counts["Score"] / s["requests"] < 0.75
    for r in [*s["by_rpc"].values(), s]:
        lat = r["latency_ms"]
        assert lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert len(result["records"]) == s["requests"] and all(rec[0] >= 0.5 for rec in result["records"])
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_open_loop_achieves_offered_rate(server: ServerThread) -> None:
    cfg = _config([server.target], {"requests": [{"weight": 1, "rpc": "Score", "model": "ngram-kn"}]},
                  rate=50.0, duration=2.0, warmup=0.5, seed=1)
    s = lt.run_loadtest(cfg, progress=False)["summary"]
    o = s["open_loop"]
    assert o["dropped_by_client"] == 0 and s["errors"] == {}
    assert 30 <= o["offered_per_s"] <= 70  # Poisson: 100 expected arrivals, σ = 10
    assert o["achieved_per_s"] == pytest.approx(o["offered_per_s"], rel=0.3)


def test_open_loop_counts_client_drops_when_in_flight_bound_is_hit(server: ServerThread) -> None:
    cfg = _config([server.target], {"requests": [{"weight": 1, "rpc": "PredictNext", "model": "gpt"}]},
                  rate=400.0, duration=1.0, warmup=0.2, max_in_flight=1)
    o = lt.run_loadtest(cfg, progress=False)["summary"]["open_loop"]
    assert o["dropped_by_client"] > 0
    assert o["offered_per_s"] > o["achieved_per_s"]


def test_unknown_model_is_counted_as_not_found(server: ServerThread) -> None:
    scenario = {"requests": [{"weight": 1, "rpc": "Score", "model": "no-such-model"},
                             {"weight": 1, "rpc": "Score", "model": "ngram-kn"}]}
    s = lt.run_loadtest(_config([server.target], scenario, concurrency=2, requests=40, warmup=0.0),
                        progress=False)["summary"]
    assert s["requests"] == 40
    assert s["errors"]["NOT_FOUND"] > 0 and s["ok"] + s["errors"]["NOT_FOUND"] == 40


@pytest.mark.parametrize(("entry", "field"), [
    ({"weight": 1, "rpc": "Scorez", "model": "gpt"}, "requests[0].rpc"),
    ({"weight": 0, "rpc": "Score", "model": "gpt"}, "requests[0].weight"),
    ({"weight": -2, "rpc": "Score", "model": "gpt"}, "requests[0].weight"),
    ({"weight": 1, "rpc": "Score"}, "requests[0].model"),
    ({"weight": 1, "rpc": "Generate", "model": "gpt", "max_new_token": 3}, "requests[0].max_new_token"),
    ({"weight": 1, "rpc": "FillMask", "model": "bert", "top_k": "5"}, "requests[0].top_k"),
])
def test_scenario_validation_names_the_field(entry: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        lt.parse_scenario({"requests": [entry]})
    with pytest.raises(ValueError, match="requests"):
        lt.parse_scenario({"requests": []})


def test_scenario_file_in_benchmarks_is_valid() -> None:
    specs = lt.load_scenario(Path(__file__).resolve().parents[1] / "benchmarks/scenarios/mixed.json")
    assert {s.rpc for s in specs} == set(lt.RPCS)


_BEFORE = """\
# TYPE plm_queue_wait_seconds histogram
plm_queue_wait_seconds_bucket{model="gpt",le="+Inf"} 10.0
plm_queue_wait_seconds_sum{model="gpt"} 0.5
plm_queue_wait_seconds_count{model="gpt"} 10.0
plm_queue_wait_seconds_bucket{model="other",le="+Inf"} 5.0
plm_queue_wait_seconds_sum{model="other"} 100.0
plm_queue_wait_seconds_count{model="other"} 5.0
# TYPE plm_inference_duration_seconds histogram
plm_inference_duration_seconds_bucket{model="gpt",stage="prefill",le="+Inf"} 4.0
plm_inference_duration_seconds_sum{model="gpt",stage="prefill"} 0.2
plm_inference_duration_seconds_count{model="gpt",stage="prefill"} 4.0
# TYPE plm_batch_size histogram
plm_batch_size_bucket{model="gpt",le="+Inf"} 4.0
plm_batch_size_sum{model="gpt"} 10.0
plm_batch_size_count{model="gpt"} 4.0
"""
_AFTER = """\
# TYPE plm_queue_wait_seconds histogram
plm_queue_wait_seconds_bucket{model="gpt",le="+Inf"} 30.0
plm_queue_wait_seconds_sum{model="gpt"} 1.5
plm_queue_wait_seconds_count{model="gpt"} 30.0
plm_queue_wait_seconds_bucket{model="other",le="+Inf"} 6.0
plm_queue_wait_seconds_sum{model="other"} 200.0
plm_queue_wait_seconds_count{model="other"} 6.0
# TYPE plm_inference_duration_seconds histogram
plm_inference_duration_seconds_bucket{model="gpt",stage="prefill",le="+Inf"} 9.0
plm_inference_duration_seconds_sum{model="gpt",stage="prefill"} 0.3
plm_inference_duration_seconds_count{model="gpt",stage="prefill"} 9.0
plm_inference_duration_seconds_bucket{model="gpt",stage="decode",le="+Inf"} 5.0
plm_inference_duration_seconds_sum{model="gpt",stage="decode"} 0.1
plm_inference_duration_seconds_count{model="gpt",stage="decode"} 5.0
# TYPE plm_batch_size histogram
plm_batch_size_bucket{model="gpt",le="+Inf"} 14.0
plm_batch_size_sum{model="gpt"} 40.0
plm_batch_size_count{model="gpt"} 14.0
"""


def test_prometheus_delta_on_handwritten_exposition() -> None:
    d = lt.prometheus_delta(_BEFORE, _AFTER, models={"gpt"})
    assert d["queue_wait"]["count"] == 20 and d["queue_wait"]["mean_ms"] == pytest.approx(50.0)
    assert d["inference"]["count"] == 10 and d["inference"]["mean_ms"] == pytest.approx(20.0)  # stages summed
    assert d["batch_size_mean"] == pytest.approx(3.0)
    assert d["padding_efficiency_mean"] is None  # absent metric: no data, not a crash
    everything = lt.prometheus_delta(_BEFORE, _AFTER)
    assert everything["queue_wait"]["count"] == 21 and everything["queue_wait"]["sum_s"] == pytest.approx(101.0)


def test_metrics_scrape_against_live_server(server: ServerThread) -> None:
    from prometheus_client import start_http_server

    port = free_port()
    start_http_server(port, addr="127.0.0.1", registry=server.running.metrics.registry)
    cfg = _config([server.target], {"requests": [{"weight": 1, "rpc": "FillMask", "model": "bert"}]},
                  concurrency=2, duration=1.0, warmup=0.3)
    result = lt.run_loadtest(cfg, metrics_url=f"http://127.0.0.1:{port}/metrics", progress=False)
    srv = result["server"]
    assert srv["batches"] > 0 and srv["batch_size_mean"] >= 1.0
    assert srv["queue_wait"]["count"] > 0 and srv["inference"]["count"] > 0
    assert 0.0 < srv["padding_efficiency_mean"] <= 1.0 + 1e-12  # a mean of ratios <= 1, from a float sum / count
    assert "server (/metrics delta)" in lt.format_report(result)


def test_two_targets_and_two_processes(server: ServerThread, tiny_repo: Path) -> None:
    second = ServerThread(make_config(tiny_repo))
    try:
        score = {"requests": [{"weight": 1, "rpc": "Score", "model": "ngram-kn"}]}
        cfg = _config([server.target, second.target], score, concurrency=4, duration=1.5, warmup=0.3)
        s = lt.run_loadtest(cfg, processes=2, progress=False)["summary"]
    finally:
        second.stop()
    assert s["errors"] == {}
    assert set(s["by_target"]) == {server.target, second.target}
    a, b = s["by_target"].values()
    assert min(a, b) > 0.3 * max(a, b)  # round-robin: close to an even split
    assert len(s["client_cpu_percent_by_worker"]) == 2


def test_pure_helpers() -> None:
    p = lt.percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50"] == 3.0 and p["max"] == 100.0 and p["p99"] is not None and p["p99"] <= 100.0
    assert lt.percentiles([])["p50"] is None
    assert lt.split_evenly(7, 3) == [3, 2, 2]
    merged = lt.merge_results([
        {"records": [[2.0, 5.0, "Score", "m", "a", "OK"]], "arrivals": 1, "dropped": 0, "window": [1.0, 3.0],
         "cpu_s": 0.5},
        {"records": [[1.5, 7.0, "Score", "m", "b", "NOT_FOUND"]], "arrivals": 2, "dropped": 1, "window": [1.0, 3.5],
         "cpu_s": 0.25},
    ])
    assert [r[0] for r in merged["records"]] == [1.5, 2.0] and merged["window"] == [1.0, 3.5]
    s = lt.summarize(merged, rate=2.0)
    assert s["errors"] == {"NOT_FOUND": 1} and s["by_target"] == {"b": 1, "a": 1}
    assert s["client_cpu_percent"] == pytest.approx(30.0) and s["open_loop"]["dropped_by_client"] == 1
    import numpy as np

    masked = lt.mask_one_word("a b c d", np.random.default_rng(0))
    assert masked.split().count("[MASK]") == 1 and len(masked.split()) == 4
