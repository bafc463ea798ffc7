"""Who gets in: the global in-flight limit and the refusal of new calls while the server drains.

Every RPC of plm.v1 passes here first, before its request is looked at: beyond `max_inflight_requests`
calls in flight a call is refused with RESOURCE_EXHAUSTED, and once shutdown has begun with UNAVAILABLE.
Both cost no inference and are counted in `plm_rejections` (model "-"). Health and reflection do not pass
here: probes must answer under overload and during the drain.
"""

from __future__ import annotations

import time

from plm.service.config import Limits
from plm.service.errors import ResourceExhausted, Unavailable
from plm.service.metrics import Metrics

GLOBAL = "-"  # the model label of rejections that happen before a model is known


class Admission:
    """Counts the calls in flight; one per server, used only from its event loop (no lock needed)."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limit = limits.max_inflight_requests
        self.inflight = 0
        self.draining = False
        self.last_refusal = 0.0  # time.monotonic() of the last call refused while draining
        self._metrics = metrics

    def enter(self) -> None:
        """Hold one in-flight place, or raise before the call runs; `leave` gives it back."""
        if self.draining:
            self.last_refusal = time.monotonic()
            self._metrics.rejections.labels(GLOBAL, "draining").inc()
            raise Unavailable("the server is shutting down; retry (another replica will answer)")
        if self.inflight >= self.limit:
            self._metrics.rejections.labels(GLOBAL, "inflight").inc()
            raise ResourceExhausted(
                f"{self.inflight} requests in flight (max_inflight_requests {self.limit}); retry later"
            )
        self.inflight += 1
        self._metrics.set_inflight(self.inflight)

    def leave(self) -> None:
        self.inflight -= 1
        self._metrics.set_inflight(self.inflight)
