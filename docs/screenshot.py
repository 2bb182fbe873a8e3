"""Make docs/dashboard.png: a small cluster on this machine (a server and three nodes),
a finished job, a job with failures and one in progress, shown by headless Chromium.

    python docs/screenshot.py [OUTPUT.png]

Needs Debian's ``chromium``. The browser is driven with tests/cdp.py (standard library
only). Every process is stopped on the way out.
"""

from __future__ import annotations

import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cdp import Browser  # noqa: E402

from achilles import Pool  # noqa: E402
from achilles.testing import Cluster, wait_until  # noqa: E402


def simulate(x: int) -> float:
    """Some work: about 0.2 s of CPU."""
    total = 0.0
    end = time.process_time() + 0.2
    while time.process_time() < end:
        total += (x % 7) ** 0.5
    return total


def fit(params: int) -> int:
    if params % 9 == 4:
        raise ValueError(f"singular matrix for parameter set {params}")
    return params


def main(out: str) -> None:
    cluster = Cluster(env={"ACHILLES_DASHBOARD": "127.0.0.1:0"})
    try:
        server = cluster.start_server()
        url = wait_until(
            lambda: re.search(r"dashboard on (\S+)", server.output()), 20, what="the dashboard"
        ).group(1)
        for name in ("gpu1", "gpu2", "cpu-box"):
            cluster.start_node(1, ACHILLES_NAME=name)
        with Pool(**cluster.kwargs()) as pool, Browser(1400, 1000) as browser:
            pool.map(abs, range(-40, 0), chunksize=2)
            for _ in range(2):
                try:
                    pool.map(fit, range(40), chunksize=1)
                except ValueError:
                    pass
            running = pool.map_async(simulate, range(150), chunksize=1)
            browser.navigate(url)
            wait_until(
                lambda: (
                    browser.js("document.querySelectorAll('#jobs tr[data-job]').length") == 1
                    and int(browser.js("document.body.dataset.updates || 0")) >= 6
                ),
                60,
                what="the job in progress on the page",
            )
            browser.screenshot(out)
            running.get(timeout=120)
    finally:
        cluster.stop()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "dashboard.png"))
