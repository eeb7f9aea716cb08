"""`captionlab workers status|stop`: the warm attempt worker servers (`captionlab.workers`) of this user."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `workers` command group."""
    workers = sub.add_parser("workers", help="the warm worker that 02's training attempts run in (kept between runs)")
    wsub = workers.add_subparsers(dest="workers_command", metavar="ACTION")
    status = wsub.add_parser("status", help="list the servers that answer, with their sockets")
    status.set_defaults(func=_status)
    stop = wsub.add_parser("stop", help="stop every server and the attempts it is running")
    stop.set_defaults(func=_stop)
    workers.set_defaults(func=lambda args: (workers.print_help(), 1)[1])


def _status(args: argparse.Namespace) -> int:
    from captionlab.workers import (
        idle_seconds,
        running_servers,
        server_dir,
        socket_path,
    )

    servers = running_servers()
    mine = socket_path()
    for pid, sock in servers:
        print(f"{pid}  {sock}{'  (this environment)' if sock == mine else ''}")
    print(f"{len(servers)} warm worker server(s) in {server_dir()}; idle timeout {idle_seconds()} s "
          f"(CAPTIONLAB_WARM_WORKER; 0 turns them off)")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from captionlab.workers import stop_servers

    pids = stop_servers()
    print(f"stopped {len(pids)} warm worker server(s){': ' + ', '.join(map(str, pids)) if pids else ''}")
    return 0
