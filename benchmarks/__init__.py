"""The achilles benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

The workload functions live in :mod:`benchmarks.workloads`, the runner in
:mod:`benchmarks.run`. Nothing is imported here, so that shipping this package's
source to achilles nodes stays cheap.
"""
