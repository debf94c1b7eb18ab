"""End-to-end tests: a real containerd using stratasnap as its proxy snapshotter.

A package (unlike the other test directories) so that its ``conftest.py`` is
imported as ``e2e.conftest`` and never shadows the top-level ``conftest``
module the other tests import helpers from. ``oci`` and ``harness`` have no
pytest dependency: ``benchmarks/containerd.py`` uses them too.
"""
