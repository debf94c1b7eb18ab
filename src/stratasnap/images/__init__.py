"""OCI images without containerd: pull, import, unpack, mount and diff on any backend.

Modules, each one reason to change: ``reference`` (names, digests),
``manifest`` (OCI/Docker documents, platforms), ``content`` (the blob store),
``hosts`` and ``registry`` (the distribution API, auth, mirrors), ``archive``
(OCI layouts, docker save), ``apply``, ``writers`` and ``compression`` (a
layer into a directory, safely, read by :mod:`stratasnap.tarstream`), ``layer_stream`` and
``unpack`` (chain IDs onto a snapshotter), ``diff`` (a snapshot's changes as a
layer), ``store`` (image records, gc) and ``pull``.
"""
