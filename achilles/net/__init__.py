"""The Twisted plumbing that the server, the nodes and the controllers share.

* :mod:`achilles.net.reactor` — the reactor thread behind a pool in the caller's process.
* :mod:`achilles.net.connection` — the framed line protocol over a transport, and the
  client side of the handshake.
* :mod:`achilles.net.memlink` — an in-memory transport for the embedded cluster.
"""
