"""The server's live web dashboard and ``/metrics`` (Twisted Web).

:func:`achilles.web.site.start` serves, beside the cluster's port, a page (HTML, JS and
CSS shipped in ``static/``, nothing from a CDN) fed by a server-sent-events stream of
the :class:`achilles.core.monitor.Monitor`'s snapshot once a second while someone
watches, and ``/metrics`` in the Prometheus text format. Open on loopback; elsewhere
it needs the cluster secret (an HMAC challenge login that sets a session cookie) or
the read-only share token. It shows no function code, arguments or results.
"""
