"""stratasnap's gRPC server: containerd's snapshots API on a unix socket.

- :mod:`.config`: the TOML configuration (``Config``), the default config
  text and the ``[proxy_plugins]`` snippet for containerd.
- :mod:`.service`: the servicer of ``containerd.services.snapshots.v1.Snapshots``.
- :mod:`.daemon`: the process: socket, lock, signals, logging (``serve``).
- :mod:`.metrics`: the optional Prometheus endpoint.
- :mod:`.api`: modules generated from ``protos/`` by ``scripts/gen-protos``.

Run it with ``python -m stratasnap.server serve --root DIR --address SOCK``.
"""
