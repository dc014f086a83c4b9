"""Passive outlier ejection: a replica failing request after request is taken out of rotation.

Like Envoy's outlier detection (consecutive_5xx / consecutive_gateway_failure): the
traffic itself is the probe. A replica whose last `consecutive` requests all failed
(a connect failure, a stream cut mid-response, an in-band engine error, a 5xx) is
ejected for `base_s` times the number of times it has been ejected in a row (capped
at `max_s`), separately from the active health checks: a replica whose /health says
200 but whose engine fails every request is exactly the one they miss. A success
resets the streak, and a replica that served a request since its last ejection
starts its backoff over. The last replica in rotation is never ejected (Envoy's
max_ejection_percent): serving from a bad replica beats serving from none.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from gateway.controlplane.targets import Target

log = logging.getLogger("gateway.outlier")


class OutlierDetector:
    def __init__(self, peers: Callable[[Target], Sequence[Target]], consecutive: int, base_s: float, max_s: float,
                 on_eject: Callable[[Target], None] = lambda target: None):
        self.peers = peers  # the targets of the app a target serves
        self.consecutive = consecutive
        self.base_s = base_s
        self.max_s = max_s
        self.on_eject = on_eject

    def failed(self, target: Target) -> None:
        """One request failed on `target` (rare path: never called for a request that succeeded)."""
        if not self.consecutive or target.ejected:
            return
        if target.successes != target.streak_mark:
            # It served a request since the streak began: this failure starts a new streak.
            target.streak_mark = target.successes
            target.failure_streak = 0
        target.failure_streak += 1
        if target.failure_streak < self.consecutive:
            return
        if not any(t is not target and t.healthy and not t.ejected for t in self.peers(target)):
            return  # never eject the last replica in rotation
        if target.successes != target.ejected_at_successes:
            target.ejections_in_row = 0  # it recovered in between: the backoff starts over
        target.ejections_in_row += 1
        target.ejections += 1
        target.ejected = True
        target.failure_streak = 0
        target.ejected_at_successes = target.successes
        duration = min(self.base_s * target.ejections_in_row, self.max_s)
        log.warning("replica %s failed %d requests in a row: ejected for %.1f s", target.replica_id,
                    self.consecutive, duration)
        self.on_eject(target)
        asyncio.get_running_loop().call_later(duration, self._return, target)

    def _return(self, target: Target) -> None:
        target.ejected = False
        log.warning("replica %s is back in rotation after its ejection", target.replica_id)
