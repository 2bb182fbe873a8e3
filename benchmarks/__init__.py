"""The achilles benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md).

:mod:`benchmarks.runner` is the runner (``main``, one child process per system and
workload), :mod:`benchmarks.cases` the child side (the workload cases),
:mod:`benchmarks.systems` the systems compared, :mod:`benchmarks.report` the table,
targets and JSON, :mod:`benchmarks.procfs` the /proc readings, and
:mod:`benchmarks.workloads` the workload functions. Nothing is imported here, so that
shipping this package's source to achilles nodes stays cheap.
"""
