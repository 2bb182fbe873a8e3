"""``python -m achilles ...``; guarded, because forkserver workers import __main__."""

import sys

from achilles.cli import main

if __name__ == "__main__":
    sys.exit(main())
