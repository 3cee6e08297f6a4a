"""`facecap api status|stop`: the local Prefect API that runs share when PREFECT_API_URL is unset."""

from __future__ import annotations

import argparse
import textwrap
import time


def register(subparsers, add_config_args) -> None:
    p = subparsers.add_parser(
        "api", help="show or stop the local Prefect API that runs share (when PREFECT_API_URL is unset)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            With no PREFECT_API_URL, the first run starts a local Prefect API (the API
            alone, no UI) in the background and later runs use it, so they skip its
            seconds of start-up. It stops by itself once execution.api_idle_minutes
            (default 10) pass without a run; --set execution.api_idle_minutes=0 on a
            run gives it a server of its own that stops with it. Its runs are kept in
            PREFECT_HOME's database, like any local Prefect server's.

              status   where it answers, its process, its log (exit 1 if none answers)
              stop     stop it now (a run in progress would lose its API: wait for it)"""))
    p.add_argument("action", choices=("status", "stop"), help="status or stop")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from facecap.prefect_api import SharedApi

    shared = SharedApi()
    if args.action == "stop":
        state = shared.stop()
        print(f"stopped the local Prefect API at {state['url']} (pid {state['pid']})" if state else
              "no local Prefect API is running")
        return 0
    state = shared.running()
    if state is None:
        booting = shared.recorded()
        if booting is not None:
            print(f"local Prefect API starting at {booting['url']}: pid {booting['pid']}, not answering yet; "
                  f"log {booting['log']}")
            return 1
        print(f"no local Prefect API is running (the next run starts one; state in {shared.dir})")
        return 1
    print(f"local Prefect API at {state['url']}: pid {state['pid']}, up {(time.time() - state['started']) / 60:.1f} "
          f"min, stops after {state['idle_minutes']:g} idle minutes; log {state['log']}")
    return 0
