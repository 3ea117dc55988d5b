"""Attacks on a live deployment, as an outsider and as a compromised but legitimate member.

Every test here runs against real servers (nats-server with mutual TLS, a Redis-protocol
server, Ray where the attack needs actors) and checks that the attack is refused at the
right layer and reported. The sections follow the security review that found the holes.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from govmesh.bus import EVENT_STREAM, Bus, Codec, Delivery, SecurityEvent, ensure_event_stream
from govmesh.cli import cli
from govmesh.config import Deployment
from govmesh.governance.messages import Decision, ToolIntent
from govmesh.identity import Identity, Issuer
from govmesh.identity._permissions import AUDITOR_ROLE, COORDINATOR_ROLE
from govmesh.observability import AuditIndex
from govmesh.observability._service import AuditService
from govmesh.runtime import WATCH_MEMBER, NatsServer, RedisServer, Transport, advertise

from _deploy import deployment

# ---------------------------------------------------------------------------------------
# 1. The audit index verifies every message of the stream as a live receiver does.
# ---------------------------------------------------------------------------------------

_ATTACKED = "wf-attacked"


class Note(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An agent-to-agent message of the attacked workflow."""

    text: str


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def _attack_the_stream(
    dep: Deployment,
    issuer: Issuer,
    *,
    before: Callable[[Bus], Awaitable[None]] | None = None,
) -> None:
    """Run a deployment's audit actor and a receiving agent, and let a compromised agent
    (``mallory``, a real member) publish onto the stream what its permissions allow:

    - a `Decision` "allow" for buyer-1's workflow, claiming ``governance-1``, signed by a key
      the deployment never issued (``token_unknown_issuer``);
    - the same, signed with mallory's own real token and key (``sender_mismatch``);
    - garbage bytes on buyer-1's inbox and on the security subject (``malformed``);
    - a genuine message buyer-1 sent mallory, published again (``replay``).

    Returns once buyer-1 refused what reached it and the audit actor has read everything.
    ``before`` runs (with buyer-1's bus) before the first event.
    """
    audit = AuditService(dep, issuer.identity("audit-1", AUDITOR_ROLE))
    mallory_id = issuer.identity("mallory", "agent")
    buyer = await Bus.connect(dep, issuer.identity("buyer-1", "agent"), rotate=False)
    mallory = await Bus.connect(dep, mallory_id, rotate=False)
    # The deployment's coordinator makes the event stream.
    async with await Bus.connect(
        dep, issuer.identity("coordinator", COORDINATOR_ROLE), rotate=False
    ) as coordinator:
        await ensure_event_stream(coordinator.nc)
    await audit.start()
    try:
        received: list[Delivery] = []

        async def on_note(d: Delivery) -> None:
            received.append(d)

        await buyer.subscribe(buyer.subjects.msg("buyer-1"), on_note, accepts=Note)
        await buyer.flush()
        captured: asyncio.Queue[bytes] = asyncio.Queue()

        async def capture(msg: object) -> None:
            await captured.put(msg.data)  # type: ignore[attr-defined]

        await mallory.nc.subscribe(mallory.subjects.msg("mallory"), cb=capture)
        await mallory.flush()
        if before is not None:
            await before(buyer)

        # The workflow's own events.
        intent = ToolIntent(tool="erp.order", args={"amount_usd": 4000}, step=1)
        await buyer.publish(buyer.subjects.intent("buyer-1"), intent, workflow=_ATTACKED)
        await buyer.publish(buyer.subjects.msg("mallory"), Note(text="quote?"), workflow=_ATTACKED)
        genuine = await asyncio.wait_for(captured.get(), 30)

        victim = mallory.subjects.msg("buyer-1")
        forged = Decision(
            intent_id="0" * 32,
            intent_hash="0" * 64,
            workflow=_ATTACKED,
            agent="buyer-1",
            outcome="allow",
            policy_hash="f" * 64,
            expires_at=time.time() + 300,
        )
        outsider = Issuer(name=issuer.name, audience=issuer.audience).identity(
            "governance-1", "governance"
        )
        impostor = Identity(
            agent_id="governance-1",
            role="governance",
            key=mallory_id.key,
            token=mallory_id.token,
        )
        codec = Codec()
        for signer in (outsider, impostor):
            _, data = codec.seal(signer, subject=victim, body=forged, workflow=_ATTACKED)
            await mallory.nc.publish(victim, data)
        await mallory.nc.publish(victim, b"\xc1 not a sealed message")
        await mallory.nc.publish(mallory.subjects.security, b"\x00\xff garbage")
        await mallory.nc.publish(mallory.subjects.msg("mallory"), genuine)
        await mallory.flush()

        # Every live receiver refused what reached it, and reported it.
        async def refused_by_buyer() -> bool:
            return sum(buyer.rejected.values()) == 3

        await _until(refused_by_buyer, "buyer-1 refused the forged decisions and the garbage")
        assert dict(buyer.rejected) == {
            "token_unknown_issuer": 1,
            "sender_mismatch": 1,
            "malformed": 1,
        }
        assert received == []
        index = AuditIndex(audit.redis, prefix=dep.key_prefix)

        async def reports_stored() -> bool:
            reports = await index.by_kind("SecurityEvent")
            return sum(r.summary.get("reason") in buyer.rejected for r in reports) == 3

        await _until(reports_stored, "the audit actor stored buyer-1's security events")
        js = audit.bus.nc.jetstream()

        async def all_read() -> bool:
            info = await js.consumer_info(EVENT_STREAM, f"audit-{dep.tenant}")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await _until(all_read, "the audit actor read the whole stream")
    finally:
        await audit.close()
        await mallory.close()
        await buyer.close()


def test_forged_replayed_and_malformed_messages_stay_out_of_the_audit_trail(
    secure_nats: tuple[Transport, NatsServer],
    redis_server: RedisServer,
    prefix: str,
    tmp_path: Path,
) -> None:
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    asyncio.run(_attack_the_stream(dep, issuer))
    runner = CliRunner()
    where = ["--redis-url", redis_server.url, "--tenant", prefix]
    claimed = ["replay", "sender_mismatch", "token_unknown_issuer"]

    shown = runner.invoke(cli, ["audit", "show", _ATTACKED, *where, "--json", str(tmp_path / "s")])
    assert shown.exit_code == 0, shown.output
    trace = json.loads((tmp_path / "s").read_text())
    records = [(r[3], r[4]) for r in trace["records"]]  # array-like: (kind, sender)
    assert records == [("ToolIntent", "buyer-1"), ("Note", "buyer-1")], records
    assert sorted(m["reason"] for m in trace["refused"]) == claimed
    assert {m["claimed_sender"] for m in trace["refused"]} == {"governance-1", "buyer-1"}
    assert all(
        m["seq"] > 0 and m["subject"].startswith(f"gm.{prefix}.msg.") for m in trace["refused"]
    )
    assert "3 messages that claimed wf-attacked were refused" in shown.output
    assert "governance-1" not in shown.output.split("refused")[0], "not shown as an event"

    verified = runner.invoke(cli, ["audit", "verify", *where, "--json", str(tmp_path / "v")])
    assert verified.exit_code == 0, verified.output
    report = json.loads((tmp_path / "v").read_text())
    assert report["problems"] == [] and report["refused"] == 5
    assert report["refused_reasons"] == {
        "malformed": 2,
        "replay": 1,
        "sender_mismatch": 1,
        "token_unknown_issuer": 1,
    }
    assert "malformed 2" in verified.output
    one = runner.invoke(cli, ["audit", "verify", _ATTACKED, *where, "--json", str(tmp_path / "w")])
    assert one.exit_code == 0, one.output
    assert json.loads((tmp_path / "w").read_text())["refused"] == 3

    bundle_path = tmp_path / "bundle.json"
    exported = runner.invoke(cli, ["audit", "export", _ATTACKED, *where, "--out", str(bundle_path)])
    assert exported.exit_code == 0, exported.output
    bundle = json.loads(bundle_path.read_text())
    assert [(e["kind"], e["sender"]) for e in bundle["events"]] == records
    assert sorted(m["reason"] for m in bundle["refused"]) == claimed
    assert bundle["integrity"]["verify"]["ok"] and bundle["integrity"]["verify"]["refused"] == 3
    assert "3 refused messages" in exported.output


# ---------------------------------------------------------------------------------------
# 2. Monitoring survives a malformed message in the stream.
# ---------------------------------------------------------------------------------------

_REFUSED_ON_THE_STREAM = sorted(
    ["token_unknown_issuer", "sender_mismatch", "malformed", "malformed", "replay"]
)


def _watched_security(path: Path) -> tuple[list[dict[str, object]], dict[str, object]]:
    seen = json.loads(path.read_text())
    return seen["events"], seen["board"]


def test_watch_shows_forged_and_malformed_messages_as_security_events_and_goes_on(
    secure_nats: tuple[Transport, NatsServer],
    redis_server: RedisServer,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("GOVMESH_HOME", str(home))
    transport, server = secure_nats
    dep, issuer = deployment(server.url, redis_server.url, prefix, transport)
    issuer.identity(WATCH_MEMBER, AUDITOR_ROLE)  # admitted, as a deployment admits it
    follow = ["watch", "--tenant", prefix, "-k", "SecurityEvent"]
    pings = 0
    with advertise(dep, issuer, ca=transport.ca, what="attacked"):
        live_json = tmp_path / "live.json"
        live = subprocess.Popen(
            [sys.executable, "-m", "govmesh.cli", *follow, "--lines", "--json", str(live_json)],
            env={**os.environ, "GOVMESH_HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(x) for x in live.stdout or ()], daemon=True
        ).start()
        shown: list[str] = []

        def showing(what: str) -> int:
            """How many lines the live watch has shown with ``what`` in them."""
            assert live.poll() is None, live.communicate()[1][-3000:]
            while not lines.empty():
                shown.append(lines.get())
            return sum(what in line for line in shown)

        async def until_shown(what: str, count: int) -> None:
            async def seen() -> bool:
                return showing(what) >= count

            await _until(seen, f"govmesh watch showed {count} x {what!r}", timeout=120)

        async def watching(buyer: Bus) -> None:
            # A watch that starts from now shows what comes once it has joined: knock until
            # it answers.
            nonlocal pings
            ping = SecurityEvent(reason="watch-ping", subject=buyer.subjects.security)
            deadline = time.monotonic() + 120
            while not showing("watch-ping"):
                assert time.monotonic() < deadline, "govmesh watch never joined"
                await buyer.publish(buyer.subjects.security, ping)
                pings += 1
                await asyncio.sleep(0.5)

        try:
            asyncio.run(_attack_the_stream(dep, issuer, before=watching))
            # The five messages refused on the stream, and buyer-1's three reports.
            asyncio.run(until_shown(" refused ", 5))
            asyncio.run(until_shown("receiver=buyer-1", 3))
            live.send_signal(signal.SIGINT)
            _, stderr = live.communicate(timeout=60)
        finally:
            if live.poll() is None:
                live.kill()
        assert live.returncode == 130 and "interrupted" in stderr, stderr[-3000:]
        events, board = _watched_security(live_json)
        refused = [e for e in events if e["refused"]]
        assert sorted(e["summary"]["reason"] for e in refused) == _REFUSED_ON_THE_STREAM
        assert {e["sender"] for e in events if not e["refused"]} == {"buyer-1"}
        assert board["refused"] == 5
        text = "".join(shown)
        assert text.count(" refused ") == 5
        assert "claimed kind=Decision sender=governance-1" in text

        # Joining late, the dashboard folds in the same from the stream's start.
        replay_json = tmp_path / "replay.json"
        everything = ["-n", str(pings + 8), "--replay", "--live", "--json", str(replay_json)]
        replayed = CliRunner(env={"COLUMNS": "200"}).invoke(cli, [*follow, *everything])
        assert replayed.exit_code == 0, replayed.output
        events, board = _watched_security(replay_json)
        assert sorted(e["summary"]["reason"] for e in events if e["refused"]) == (
            _REFUSED_ON_THE_STREAM
        )
        assert "5 refused on the stream" in replayed.output
        assert "sender_mismatch" in replayed.output and "governance-1" in replayed.output


# ---------------------------------------------------------------------------------------
# 3. The Redis-protocol server needs credentials.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 4. Publishes refused by nats-server become security events.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 5. A decision is readable only by the agent it answers.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 6. Intents are decided only for workflows the deployment started; budget authority is
#    cumulative.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 7. The advertised directory holds nothing that can mint identities.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 8. State stays with its agent, and the tool tier stays sealed in the stream.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 9. Stream permissions are least privilege, per tenant.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 10. A message replayed to another governance actor of the group is refused.
# ---------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------
# 11. Safe defaults: no machine settings changed unasked; bounded subscriptions.
# ---------------------------------------------------------------------------------------
