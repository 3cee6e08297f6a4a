"""`facecap warm status|stop`: the warm processes that curate commands fork from (facecap/warm_process.py)."""

from __future__ import annotations

import argparse
import textwrap
import time


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "warm", help="show or stop the warm processes that curate commands fork from",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            After a `facecap curate`, a process that has imported FaceCap's code
            (Prefect, Dask, the flow, Great Expectations) stays in the background;
            the next curate command in the same environment (same interpreter,
            code, packages and environment variables) runs in a fork of it and
            skips seconds of imports. It exits once execution.warm_minutes
            (default 10; FACECAP_WARM_MINUTES) pass without a command; 0 turns it
            off. At most two run per user.

              status   this user's warm processes: pid, age, idle limit, log (exit 1 if none)
              stop     stop them (each finishes the commands it is running first)"""))
    p.add_argument("action", choices=("status", "stop"), help="status or stop")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.warm_process import running, stop

    found = running()
    if args.action == "stop":
        for state in found:
            gone = stop(state)
            print(f"stopped the warm process {state['pid']}" if gone else
                  f"the warm process {state['pid']} is still finishing a command; it exits after it")
        if not found:
            print("no warm process is running")
        return 0
    for state in found:
        print(f"warm process {state['pid']}: up {(time.time() - state['started']) / 60:.1f} min, last used "
              f"{(time.time() - state['last_used']) / 60:.1f} min ago, exits after {state['idle_minutes']:g} idle "
              f"minutes; {state['executable']}; log {state['log']}")
    if not found:
        print("no warm process is running (the next `facecap curate` leaves one)")
    return 0 if found else 1
