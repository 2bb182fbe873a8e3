"""Stream a large generator through the cluster without holding it in memory.

The generator is read only as fast as results come back (a bounded window of chunks),
and results are handled as they finish, in whatever order that is.
"""

import hashlib

from achilles import Pool


def records(n):
    for i in range(n):
        yield f"record-{i}".encode()


def digest(data):
    return hashlib.sha256(data).hexdigest()[:8]


if __name__ == "__main__":
    n = 200_000
    seen = 0
    with Pool() as pool:
        for _ in pool.imap_unordered(digest, records(n), chunksize=2_000):
            seen += 1
    print(f"hashed {seen:,} records")
