"""Failed logins per source address: a few are free, then each costs an exponentially
longer wait; counted, and reported once per interval rather than once per attempt
(before this, one client made about 2,650 online guesses a second, each a log line).
Sans-IO: time comes in as a number."""

from __future__ import annotations

from dataclasses import dataclass

#: failed logins an address may make before it has to wait
FREE_FAILURES = 5
#: the first wait, doubled with every further failure, up to MAX_DELAY
BASE_DELAY = 1.0
MAX_DELAY = 300.0
#: failures are reported (logged) at most once per address per interval
REPORT_INTERVAL = 60.0
#: addresses remembered at once (the oldest is forgotten first): bounded memory
MAX_ADDRESSES = 10_000


@dataclass
class _Address:
    failures: int = 0  # in a row (a success clears the address)
    last: float = 0.0  # time of the last failure
    unreported: int = 0  # failures since the last report


class LoginThrottle:
    """Call :meth:`delay` before a login, :meth:`failed` or :meth:`succeeded` after it,
    and :meth:`report` now and then."""

    def __init__(self) -> None:
        self._addresses: dict[str, _Address] = {}
        self._last_report = 0.0

    def delay(self, host: str, now: float) -> float:
        """Seconds ``host`` must still wait before its next login is heard (0: none)."""
        a = self._addresses.get(host)
        if a is None or a.failures <= FREE_FAILURES:
            return 0.0
        wait = min(MAX_DELAY, BASE_DELAY * 2 ** (a.failures - FREE_FAILURES - 1))
        return max(0.0, a.last + wait - now)

    def failed(self, host: str, now: float) -> bool:
        """Count a failed login; True if it is the first from ``host`` since the last
        report (log it now; the rest are in the next report)."""
        a = self._addresses.pop(host, None) or _Address()
        self._addresses[host] = a  # most recent last: eviction takes the oldest
        if len(self._addresses) > MAX_ADDRESSES:
            del self._addresses[next(iter(self._addresses))]
        a.failures += 1
        a.last = now
        a.unreported += 1
        return a.unreported == 1

    def succeeded(self, host: str) -> None:
        """A good login: the address starts afresh."""
        self._addresses.pop(host, None)

    def report(self, now: float) -> list[tuple[str, int, float]]:
        """Once per REPORT_INTERVAL (else []): (address, failures since the last report,
        seconds it must now wait) for each address that failed since then."""
        if now - self._last_report < REPORT_INTERVAL:
            return []
        self._last_report = now
        out = []
        for host, a in self._addresses.items():
            if a.unreported:
                out.append((host, a.unreported, self.delay(host, now)))
                a.unreported = 0
        return out
