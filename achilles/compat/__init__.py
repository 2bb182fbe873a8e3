"""Every use of a dependency's private API, one module per dependency, each pinned by a
test (``tests/unit/test_compat_*.py``) so that an upgrade that moves it fails there,
by name, rather than somewhere in a running cluster."""
