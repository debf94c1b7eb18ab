"""The ``check`` verb: is this root healthy? With ``--repair``, make right what is safe."""

from __future__ import annotations

import json

import click

from ..check import Report
from ..check import check as check_root
from ..check import repair as repair_root
from ..findings import Finding, Repair
from ._app import Session

__all__ = ["check"]


@click.command()
@click.option(
    "--repair",
    "do_repair",
    is_flag=True,
    help="Do what is safe: reclaim storage no snapshot owns, finish interrupted removes "
    "and commits, unmount stale mounts, detach stale loop devices. Never deletes a "
    "snapshot's data (a missing or corrupt layer may be another's parent: those need a "
    "person). Refused while a server serves the root.",
)
@click.option(
    "--deep",
    is_flag=True,
    help="Also read the data the backend can verify (erofs: hash every layer image and "
    "compare it with the sha256 recorded at commit). Reads every layer: about as long as "
    "reading all the images once.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.pass_obj
def check(session: Session, do_repair: bool, deep: bool, as_json: bool) -> None:
    """Check the root: the store, and the storage as the backend lays it out.

    Looks at SQLite's integrity, that every snapshot has its storage and all
    storage its snapshot, that parents exist, form no cycle and are
    committed, at leftovers of interrupted creates, commits and removes, at
    mounts and loop devices on storage no snapshot owns, and at what the
    backend keeps (blockfile: every image holds a filesystem; erofs: every
    committed layer has its image, nothing else mounted on it, and with
    --deep the image's digest is the one recorded at commit). Without
    --repair it changes nothing and is safe next to a running server.

    Each finding says what --repair would do, or that it needs a person.
    Exit status: 0 healthy, 1 problems remain, 7 when --repair is refused
    because a server serves the root, 4 when there is no store at the root.

    \b
    Examples:
      stratasnap --backend overlay check
      stratasnap --backend overlay check --repair
      stratasnap --backend erofs check --deep
      stratasnap check --json | jq '.remaining[].code'
    """
    if do_repair:
        report = repair_root(session.root, session.backend, session.options, deep)
    else:
        report = check_root(session.root, session.backend, deep)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print(report, do_repair)
    if not report.healthy:
        click.get_current_context().exit(1)


def _print(report: Report, repaired: bool) -> None:
    for finding in report.repaired:
        click.echo(f"repaired  {_line(finding)}")
    for finding in report.remaining:
        label = "PERSON" if finding.repair is Repair.PERSON else "found"
        click.echo(f"{label:8}  {_line(finding)}")
    n = len(report.remaining)
    state = "healthy" if not n else f"{n} problem{'' if n == 1 else 's'}"
    if repaired and report.repaired:
        state += f" ({len(report.repaired)} repaired)"
    elif n and not repaired and any(f.repair is not Repair.PERSON for f in report.remaining):
        state += "; --repair fixes those not marked PERSON"
    click.echo(f"{report.root} ({report.backend}, {report.snapshots} snapshots): {state}")


def _line(finding: Finding) -> str:
    return f"{finding.code}  {finding.where}: {finding.what} [{finding.repair.value}]"
