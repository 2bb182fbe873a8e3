"""The first script: square numbers on every core of the cluster.

With nothing configured, Pool() starts an embedded cluster on this machine; with
ACHILLES_HOST / ACHILLES_PORT / ACHILLES_SECRET_KEY set (or a .env file), the same
script runs on every node of that cluster.
"""

from achilles import Pool  # was: from multiprocessing import Pool


def square(x):
    return x * x


if __name__ == "__main__":
    with Pool() as pool:
        print(pool.map(square, range(10)))
        # several jobs one after another on the same pool, as the seed's README shows
        for n in (100, 1000):
            print(n, sum(pool.map(square, range(n))))
