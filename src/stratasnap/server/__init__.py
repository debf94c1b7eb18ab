"""stratasnap's gRPC server: containerd's snapshots API on a unix socket.

- :mod:`.config`: the TOML configuration (``load_config``), the default config
  text and the ``[proxy_plugins]`` snippet for containerd.
- :mod:`.service`: the servicer of ``containerd.services.snapshots.v1.Snapshots``.
- :mod:`.daemon`: the process: lock, socket, gRPC, signals, logs (``Server``, ``serve``).
- :mod:`.metrics`: the optional Prometheus endpoint.
- :mod:`.client`: the Snapshotter protocol over a socket (tests, benchmarks, tools).
- :mod:`.commands`: the ``serve`` and ``config`` click verbs.
- :mod:`.api`: modules generated from ``protos/`` by ``scripts/gen-protos`` (:mod:`.protogen`).

Run it with ``python -m stratasnap.server serve --root DIR --address SOCK``.
Importing this package imports nothing else (no grpc).
"""
