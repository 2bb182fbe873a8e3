"""Estimate pi by throwing random darts, in batches spread across the cluster."""

import random

from achilles import Pool

BATCHES = 32
DARTS_PER_BATCH = 50_000


def hits(seed):
    rng = random.Random(seed)
    inside = 0
    for _ in range(DARTS_PER_BATCH):
        x, y = rng.random(), rng.random()
        inside += x * x + y * y <= 1.0
    return inside


if __name__ == "__main__":
    with Pool() as pool:
        inside = sum(pool.imap_unordered(hits, range(BATCHES)))
    estimate = 4 * inside / (BATCHES * DARTS_PER_BATCH)
    print(f"pi is about {estimate:.4f} ({BATCHES * DARTS_PER_BATCH:,} darts)")
