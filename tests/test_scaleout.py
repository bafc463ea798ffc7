"""Scale-out on one machine: three `plm serve` processes behind the client's round-robin.

Load spreads evenly (each replica's own request counter within ±15 % of a third), and killing one replica
mid-run loses no request: the SDK retries UNAVAILABLE on the next target.
"""

from __future__ import annotations

import concurrent.futures
import re
import urllib.request
from pathlib import Path

from plm.client import PlmClient
from plm.client.local_server import LocalServer

SENTENCES = ["the king is dead", "to be or not to be", "what light through yonder window breaks"]


def _ok_scores(srv: LocalServer) -> int:
    assert srv.metrics_url is not None
    text = urllib.request.urlopen(srv.metrics_url, timeout=10).read().decode()
    m = re.search(r'plm_requests_total\{code="OK",method="Score",model="ngram-kn",protocol="grpc"\} (\S+)', text)
    return int(float(m.group(1))) if m else 0


def test_three_replicas_share_the_load_and_survive_a_kill(tiny_repo: Path) -> None:
    with concurrent.futures.ThreadPoolExecutor(3) as starter:
        replicas = list(starter.map(lambda _: LocalServer(tiny_repo, ["ngram-kn"], metrics=True), range(3)))
    try:
        with PlmClient([r.target for r in replicas], timeout=30) as client:

            def call(i: int) -> float:
                return client.score("ngram-kn", [SENTENCES[i % len(SENTENCES)]]).scores[0].log_prob

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                assert all(lp < 0 for lp in pool.map(call, range(300)))
            counts = [_ok_scores(r) for r in replicas]
            assert sum(counts) == 300
            assert all(abs(c - 100) <= 15 for c in counts), counts  # even within ±15 %

            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(call, i) for i in range(300)]
                futures[100].result()
                replicas[0].proc.kill()  # mid-run, without a graceful drain
                results = [f.result() for f in futures]  # any lost request would raise here
            assert len(results) == 300 and all(lp < 0 for lp in results)
            # The survivors answered what the dead replica no longer could: all but its share before the kill.
            gained = sum(_ok_scores(r) for r in replicas[1:]) - sum(counts[1:])
            assert gained >= 200, gained
    finally:
        for r in replicas:
            r.stop()
