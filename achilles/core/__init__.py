"""Sans-IO state machines: the server's scheduler, the controller's job bookkeeping,
and the pacing rule both share with the nodes.

Nothing in this package imports twisted, dill, multiprocess, socket, threading or time;
``tests/unit/test_layering.py`` checks it.
"""
