"""Test helpers shipped with stratasnap, for its own backends and third-party ones.

``SnapshotterConformance`` is a pytest mixin holding containerd's snapshotter
test scenarios (written in our own words) and the contract's error tables.
A backend's test module subclasses it and says how to open the backend::

    class TestMyBackend(SnapshotterConformance):
        backend = "mine"
"""

from .conformance import SnapshotterConformance, mounted

__all__ = ["SnapshotterConformance", "mounted"]
