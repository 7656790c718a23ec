#!/usr/bin/env python3
"""Look after the instances a datalab proxy started (culling also ends them by itself).

    .venv/bin/python scripts/datalab-admin.py list
    .venv/bin/python scripts/datalab-admin.py remove ID [ID ...]
    .venv/bin/python scripts/datalab-admin.py remove --all

Every argument of `remove` but --all and --help is an id, whatever its first character (older ids
may start with '-'; new ones never do).

Uses the same settings as a proxy started in the same environment: DATALAB_REDIS_URL,
DATALAB_KEY_PREFIX (or --redis-url, --prefix), DATALAB_BACKEND, DATALAB_IMAGE, DATALAB_JUPYTER_ENV...
Removing stops the instance (container or process) and deletes its record, nonces and sessions;
every proxy sharing the Redis drops its routes to it at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))

import inputs  # noqa: E402
from config import Settings  # noqa: E402
from config import settings_from_environment  # noqa: E402
from runtime import build_instances  # noqa: E402


async def run(args: argparse.Namespace) -> None:
    settings = settings_from_environment(sign_key="unused", redis_url=args.redis_url, key_prefix=args.prefix)
    instances = build_instances(settings)
    try:
        if args.command == "list":
            for inst in await instances.all():
                state = "running" if await instances.backend.poll(inst) else "gone"
                age = inst.age(time.time())
                name = inputs.shown(inst.filename) if inst.filename else "(in the pool)"  # one line each
                print(f"{inst.id}  {state:7s}  {inst.host}:{inst.port}  {age / 60:7.1f} min  {name}")
        elif args.all:
            print(f"removed {await instances.end_all('removed by an operator')} instances")
        else:
            by_id = {inst.id: inst for inst in await instances.all()}
            for ident in args.ids:
                if ident not in by_id:
                    sys.exit(f"no instance {ident} under prefix {args.prefix}")
                await instances.end(by_id[ident], "removed by an operator")
                print(f"removed {ident}")
    finally:
        await instances.store.close()


OPTIONS_WITH_VALUE = ("--redis-url", "--prefix")
REMOVE_FLAGS = ("--all", "-h", "--help")


def ids_apart(argv: list[str]) -> list[str]:
    """The command line with `remove`'s ids after a '--', where argparse reads none as an option:
    ids are random, and one in 64 made before new_instance_id starts with '-'."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):  # the options before the command
        i += 2 if argv[i] in OPTIONS_WITH_VALUE else 1
    if i >= len(argv) or argv[i] != "remove":
        return argv
    rest = argv[i + 1 :]
    flags = [a for a in rest if a in REMOVE_FLAGS]
    ids = [a for a in rest if a not in REMOVE_FLAGS and a != "--"]
    return [*argv[: i + 1], *flags, *(["--", *ids] if ids else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("DATALAB_REDIS_URL", Settings.redis_url))
    parser.add_argument("--prefix", default=os.environ.get("DATALAB_KEY_PREFIX", Settings.key_prefix))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list instances")
    remove = sub.add_parser("remove", help="stop and forget instances")
    remove.add_argument("ids", nargs="*")
    remove.add_argument("--all", action="store_true")
    args = parser.parse_args(ids_apart(sys.argv[1:]))
    if args.command == "remove" and not (args.ids or args.all):
        parser.error("remove needs instance ids or --all")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
