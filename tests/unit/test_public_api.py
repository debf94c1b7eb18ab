"""The public surface is deliberate: adding or dropping a name is a decision."""

from __future__ import annotations

import inspect

import stratasnap


def test_all_is_exactly_the_public_surface() -> None:
    assert sorted(stratasnap.__all__) == [
        "AlreadyExists",
        "BaseSnapshotter",
        "FailedPrecondition",
        "Info",
        "InvalidArgument",
        "Kind",
        "Mount",
        "NotFound",
        "Reclaimed",
        "ResourceExhausted",
        "SnapshotError",
        "Snapshotter",
        "Unavailable",
        "Unimplemented",
        "Usage",
        "errors",
        "open_snapshotter",
    ]
    for name in stratasnap.__all__:
        assert getattr(stratasnap, name) is not None
    # Submodules imported along the way (and the __future__ feature) are not API;
    # every other public name must be listed, and `errors` is listed on purpose.
    public = {
        n
        for n, v in vars(stratasnap).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
    }
    assert public | {"errors"} == set(stratasnap.__all__)


def test_errors_map_to_grpc_codes_and_exit_codes() -> None:
    from stratasnap import errors

    table = {
        errors.InvalidArgument: (3, "invalid argument"),
        errors.NotFound: (5, "not found"),
        errors.AlreadyExists: (6, "already exists"),
        errors.ResourceExhausted: (8, "resource exhausted"),
        errors.FailedPrecondition: (9, "failed precondition"),
        errors.Unimplemented: (12, "not implemented"),
        errors.Unavailable: (14, "unavailable"),
    }
    exit_codes = set()
    for cls, (code, text) in table.items():
        assert issubclass(cls, errors.SnapshotError)
        assert cls.grpc_code == code
        assert str(cls('snapshot "k"')) == f'snapshot "k": {text}'
        exit_codes.add(cls.exit_code)
    assert len(exit_codes) == len(table) and 0 not in exit_codes and 2 not in exit_codes


def test_library_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with stratasnap.open_snapshotter(tmp_path / "root") as sn:
        assert isinstance(sn, stratasnap.Snapshotter)
        sn.prepare("a", labels={"k": "v"})
        sn.commit("c", "a")
        assert [i.name for i in sn.walk()] == ["c"]
