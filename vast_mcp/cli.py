"""The `vast-mcp` command line: one sub-command per entry point of the product."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import VastMCPError

Handler = Callable[[argparse.Namespace], int]


def _add_sim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sim", help="run the simulated Vast cloud in the foreground (no account needed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    p.add_argument("--api-key", default=None, help="API key the simulated account accepts (default: random)")
    p.add_argument(
        "--limits",
        type=float,
        default=1.0,
        help="scale of Vast's per-route rate limits (1 = as Vast documents them, 0 = none)",
    )
    p.add_argument(
        "--pull-scale",
        type=float,
        default=0.0,
        help="image pulls take their real time (about 45 s per GB) times this (default 0: no pull time)",
    )

    def run(args: argparse.Namespace) -> int:
        from .sim.server import main as sim_main

        return sim_main(
            host=args.host, port=args.port, api_key=args.api_key, limits=args.limits, pull_scale=args.pull_scale
        )

    p.set_defaults(handler=run)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the MCP server (stdio by default; what MCP clients start)")
    p.add_argument("--http", action="store_true", help="serve streamable HTTP on 127.0.0.1 instead of stdio")
    p.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")

    def run(args: argparse.Namespace) -> int:
        from .entry import serve

        return serve(http=args.http, port=args.port)

    p.set_defaults(handler=run)


def _add_reap(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reap", help="destroy instances left behind by sessions whose server is gone")
    p.add_argument("--session", default=None, help="take over this session and destroy its instances")
    p.add_argument("--within", type=float, default=300.0, help="seconds to keep trying to confirm (default 300)")

    def run(args: argparse.Namespace) -> int:
        from .entry import reap

        return reap(session_id=args.session, within=args.within)

    p.set_defaults(handler=run)


def _add_supervise(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "supervise", help="finish approved runs whose client went away (the server starts it; one per state dir)"
    )

    def run(args: argparse.Namespace) -> int:
        from .entry import supervise

        return supervise()

    p.set_defaults(handler=run)


def _add_runs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("runs", help="runs of this machine: list, show ID, cancel ID (destroys at once), fetch ID")
    p.add_argument("action", nargs="?", default="list", choices=["list", "show", "cancel", "fetch"])
    p.add_argument("run_id", nargs="?", default=None, help="the run (r-...)")

    def run(args: argparse.Namespace) -> int:
        from .runs_cli import runs

        return runs(args.action, args.run_id)

    p.set_defaults(handler=run)


def _add_ledger(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ledger", help="print every instance the ledger tracks, with its cost")
    p.add_argument("--live", action="store_true", help="only instances that may still exist")

    def run(args: argparse.Namespace) -> int:
        from .entry import ledger

        return ledger(live_only=args.live)

    p.set_defaults(handler=run)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="run the whole workflow on the simulated cloud (no account needed)")
    p.add_argument("--results", default="vast-demo-results", help="folder for the downloaded results")
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="give up when the instance is not usable over SSH after S seconds (default 120)",
    )
    p.add_argument(
        "--sim-fault",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="give the demo's instance a simulated fault, to see a failure handled: never_boots, exit_after=S, "
        "ssh_refuse_for=S, price_multiplier=X, boot_delay=S, bandwidth_limit=BPS (repeatable)",
    )

    def run(args: argparse.Namespace) -> int:
        from .demo.run import main as demo_main

        return demo_main(args.results, ready_timeout=args.ready_timeout, sim_faults=args.sim_fault)

    p.set_defaults(handler=run)


def _add_doctor(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check the API key, the API, SSH key registration and the state directory")

    def run(args: argparse.Namespace) -> int:
        from .entry import doctor

        return doctor()

    p.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vast-mcp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vast-mcp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_serve(sub)
    _add_sim(sub)
    _add_reap(sub)
    _add_ledger(sub)
    _add_runs(sub)
    _add_supervise(sub)
    _add_doctor(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except VastMCPError as exc:
        print(f"vast-mcp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
