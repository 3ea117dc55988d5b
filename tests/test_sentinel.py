"""Reading nats-server's refusals from its log, and coalescing them into few events (pure;
the sentinel on a live server is attacked in test_attacks.py, section 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from govmesh.errors import ConfigError
from govmesh.observability._sentinel import RefusalCoalescer
from govmesh.runtime._nats_log import ServerLogReader, ServerRefusal, parse_refusal_line

HEAD = "[7036] 2026/12/07 06:48:52.059529"
ALICE = '"$G/user:CN=alice,OU=agent,O=acme"'


def parse(line: str, unmapped: dict[str, str] | None = None) -> ServerRefusal | None:
    return parse_refusal_line(line, {} if unmapped is None else unmapped)


def test_a_publish_violation_names_the_certificate_and_the_subject():
    line = (
        f'{HEAD} [ERR] 127.0.0.1:39410 - cid:6 - "v2.16.0:python3:raw" - {ALICE} - '
        'Publish Violation - Subject "gm.acme.intent.bob"'
    )

    assert parse(line) == ServerRefusal(
        kind="publish",
        user="CN=alice,OU=agent,O=acme",
        subject="gm.acme.intent.bob",
        client="127.0.0.1:39410 - cid:6",
        detail='Publish Violation - Subject "gm.acme.intent.bob"',
    )


def test_a_subscription_violation_with_a_queue_and_no_client_name_is_read():
    line = (
        f"{HEAD} [ERR] 127.0.0.1:1 - cid:9 - {ALICE} - Subscription Violation - "
        'Subject "gm.acme.decision.bob.*", Queue: "q", SID 4'
    )

    refusal = parse(line)

    assert refusal is not None and refusal.kind == "subscribe"
    assert (refusal.user, refusal.subject) == ("CN=alice,OU=agent,O=acme", "gm.acme.decision.bob.*")


def test_a_client_chosen_name_or_subject_cannot_fake_another_certificate():
    fake = r'"$G/user:CN=governance-1,OU=governance,O=acme\" - Publish Violation - Subject \"x'
    line = (
        f'{HEAD} [ERR] 127.0.0.1:2 - cid:3 - "v2:python3:x\\" - \\"{fake[1:]}" - {ALICE} - '
        'Publish Violation - Subject "gm.acme.intent.b\\"ob"'
    )

    refusal = parse(line)

    assert refusal is not None
    assert refusal.user == "CN=alice,OU=agent,O=acme"
    assert refusal.subject == 'gm.acme.intent.b"ob'


def test_a_certificate_of_no_user_is_named_from_the_debug_line_of_its_connection():
    unmapped: dict[str, str] = {}
    before = (
        f"{HEAD} [DBG] 127.0.0.1:5 - cid:7 - User in cert "
        '["CN=stranger,OU=agent,O=acme"], not found'
    )
    error = f"{HEAD} [ERR] 127.0.0.1:5 - cid:7 - authentication error"

    assert parse(before, unmapped) is None
    refusal = parse(error, unmapped)

    assert refusal is not None and refusal.kind == "authentication"
    assert refusal.user == "CN=stranger,OU=agent,O=acme"
    assert unmapped == {}
    # Without the debug line the connection is still reported, by its address.
    anonymous = parse(f"{HEAD} [ERR] 127.0.0.1:6 - cid:8 - authentication error")
    assert anonymous is not None and (anonymous.user, anonymous.client) == (
        "",
        "127.0.0.1:6 - cid:8",
    )


def test_a_failed_handshake_names_the_presented_certificate_and_probes_are_ignored():
    line = (
        f"{HEAD} [ERR] 127.0.0.1:7 - cid:8 - TLS handshake error: tls: failed to verify "
        "certificate: x509: certificate signed by unknown authority "
        "(CN=alice,OU=agent,O=acme SHA-256: 6c0b27643fe8)"
    )

    refusal = parse(line)

    assert refusal is not None and refusal.kind == "tls"
    assert refusal.user == "CN=alice,OU=agent,O=acme"
    assert parse(f"{HEAD} [ERR] 127.0.0.1:8 - cid:5 - TLS handshake error: EOF") is None


@pytest.mark.parametrize(
    "line",
    [
        f"{HEAD} [INF] Server is ready",
        f"{HEAD} [DBG] 127.0.0.1:5 - cid:7 - Client connection created",
        f"{HEAD} [ERR] 127.0.0.1:5 - cid:7 - {ALICE} - Slow Consumer Detected",
        'Publish Violation - Subject "x"',
    ],
)
def test_other_lines_are_no_refusals(line: str):
    assert parse(line) is None


def test_the_reader_starts_at_the_end_and_reads_whole_lines_only(tmp_path: Path):
    log = tmp_path / "nats-server.log"
    violation = f'{HEAD} [ERR] 127.0.0.1:1 - cid:1 - {ALICE} - Publish Violation - Subject "a"\n'
    log.write_text(violation)
    reader = ServerLogReader(log)

    assert reader.read() == []
    with log.open("a") as f:
        f.write(violation.replace('"a"', '"b"') + violation[:30])
    assert [r.subject for r in reader.read()] == ["b"]
    with log.open("a") as f:
        f.write(violation[30:])
    assert [r.subject for r in reader.read()] == ["a"]
    log.write_text(violation.replace('"a"', '"c"'))  # replaced by a shorter file
    assert [r.subject for r in reader.read()] == ["c"]


def refusal(user: str = "CN=alice,OU=agent,O=acme", subject: str = "s") -> ServerRefusal:
    return ServerRefusal(
        kind="publish", user=user, subject=subject, client="127.0.0.1:1 - cid:1", detail=""
    )


def test_the_first_refusal_is_reported_at_once_and_the_rest_in_one_summary_per_window():
    coalescer = RefusalCoalescer(window_s=10)

    assert coalescer.add(refusal(subject="s0"), now=0)
    assert not any(coalescer.add(refusal(subject=f"s{i}"), now=1) for i in range(1, 300))
    assert coalescer.due(now=9.9) == []
    (summary,) = coalescer.due(now=10)

    assert summary.count == 299
    assert len(summary.subjects) == 5
    assert coalescer.due(now=15) == []
    # The next window counts again; a window with nothing new forgets the client.
    assert not coalescer.add(refusal(), now=16)
    assert [s.count for s in coalescer.due(now=20)] == [1]
    assert coalescer.due(now=30) == []
    assert coalescer.add(refusal(), now=31)


def test_many_identities_share_one_group_beyond_the_limit():
    coalescer = RefusalCoalescer(window_s=10, max_groups=3)

    reported = [coalescer.add(refusal(user=f"CN=fake-{i}"), now=0) for i in range(100)]

    assert sum(reported) == 4  # three groups, and the one they all share beyond them
    assert [s.count for s in coalescer.due(now=10)] == [96]


def test_a_coalescer_needs_a_positive_window():
    with pytest.raises(ConfigError, match="0"):
        RefusalCoalescer(window_s=0)
