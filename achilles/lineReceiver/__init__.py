"""The original achilles (0.0.196) API, as thin adapters over this package.

Code written for the seed keeps working::

    from achilles.lineReceiver.achilles_server import runAchillesServer, genConfig
    from achilles.lineReceiver.achilles_node import runAchillesNode
    from achilles.lineReceiver.achilles_main import map, imap, imap_unordered, killCluster

The modules only translate: settings go through :func:`achilles.config.resolve`, work
goes through :class:`achilles.Pool`, and the seed's result packets
(``{'ARGS_COUNTER', 'RESULT'}``) are assembled in :mod:`.achilles_main` from the
pool's results. Importing this package starts nothing.
"""
