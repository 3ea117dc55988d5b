"""Forward a running govmesh deployment's events to a JSONL file, one verified event a line.

    python examples/monitoring/forward_jsonl.py events.jsonl [--tenant acme] [--kind Decision]

Start it before or while ``govmesh run`` runs (it waits ``--wait`` seconds, 60 by default,
for the deployment); it stops when the deployment stops, or on Ctrl-C. Run again on the
same file, it goes on after the last event the file holds (a stream sequence number), so
nothing is written twice and nothing the stream still keeps is missed; on a new file it
starts at the stream's first event. Messages that fail verification are never written: each
is reported on stderr.

Only ``govmesh``'s public API is used: `govmesh.EventStream` and the events it yields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import govmesh


def last_seq(path: Path) -> int:
    """The stream sequence number of the last event in ``path``; 0 for none."""
    if not path.exists():
        return 0
    last = 0
    with path.open() as lines:
        for line in lines:
            if line.strip():
                last = int(json.loads(line)["seq"])
    return last


def report(message: govmesh.RefusedMessage) -> None:
    """Say on stderr that a message of the stream was refused, and what it claimed."""
    print(
        f"refused stream #{message.seq} ({message.reason}): claimed {message.kind or '?'} "
        f"from {message.claimed_sender or '?'} for {message.workflow or 'no workflow'}",
        file=sys.stderr,
    )


async def forward(path: Path, *, tenant: str | None, kinds: list[str], wait_s: float) -> int:
    """Append the deployment's events to ``path`` until it stops; how many were written."""
    after = last_seq(path)
    written = 0
    stream = govmesh.EventStream(
        tenant=tenant,
        kinds=kinds,
        start=after + 1 if after else "first",
        on_refused=report,
        wait_s=wait_s,
    )
    async with stream:
        with path.open("a") as out:
            async for event in stream:
                line = {
                    "seq": event.seq,
                    "stored_at": event.stored_at,
                    "id": event.id,
                    "kind": event.kind,
                    "sender": event.sender,
                    "workflow": event.workflow,
                    "causation": event.causation,
                    "summary": event.summary(),
                }
                out.write(json.dumps(line) + "\n")
                out.flush()
                written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Forward a deployment's events to JSONL.")
    parser.add_argument("path", type=Path, help="the JSONL file to append to")
    parser.add_argument("--tenant", help="the deployment's tenant (the only one running)")
    parser.add_argument("--kind", action="append", default=[], help="only these kinds")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it")
    args = parser.parse_args()
    try:
        written = asyncio.run(
            forward(args.path, tenant=args.tenant, kinds=args.kind, wait_s=args.wait)
        )
    except KeyboardInterrupt:
        sys.exit(130)
    except govmesh.GovmeshError as exc:
        sys.exit(f"forward_jsonl: {exc}")
    print(f"{written} events written to {args.path}", file=sys.stderr)


if __name__ == "__main__":
    main()
