"""Sans-IO state machines: the server's scheduler and the controller's job bookkeeping.

Nothing in this package imports twisted, dill, multiprocess, socket, threading or time;
``tests/unit/test_layering.py`` checks it.
"""
