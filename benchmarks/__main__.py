"""``python -m benchmarks`` (from the repository root): run the benchmark suite."""

import sys

from benchmarks.runner import main

if __name__ == "__main__":
    sys.exit(main())
