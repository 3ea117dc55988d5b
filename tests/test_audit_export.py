"""Audit after a run ends: a finished run keeps its record, which `govmesh audit` shows,
verifies and exports as an evidence bundle; cost per model call; retention that verify
tells apart from tampering."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from test_cli import ESCALATING, GOVMESH, ROOT, _env

from govmesh.agents.messages import Outcome, WorkflowStart
from govmesh.bus import Codec, Envelope, Subjects
from govmesh.cli import cli
from govmesh.config import key_prefix
from govmesh.errors import ConfigError
from govmesh.forecasting._budget import workflow_spend_keys
from govmesh.governance._approvals import Answer, ApprovalRecord, ApprovalStore
from govmesh.governance._evaluator import EvalContext, Intent
from govmesh.governance._replay import DecisionRecord, decisions_key
from govmesh.identity import Issuer, SigningKey
from govmesh.observability import AuditIndex, RefusedMessage
from govmesh.observability._export import bundle_digest, prune_index
from govmesh.runtime import RedisServer
from govmesh.scenarios._records import (
    kept_run,
    open_kept,
    parse_duration,
    prune_kept,
    record_dir,
)
from govmesh.scenarios._runs import RunManifest, save_manifest

from _procs import processes_with_marker

DAY = 86400.0


def _govmesh(args: list[str], home: Path, mark: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GOVMESH, *args],
        cwd=cwd,
        env=_env(mark, home) | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_finished_run_can_be_shown_verified_and_exported_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, mark = tmp_path / "home", uuid.uuid4().hex
    monkeypatch.setenv("GOVMESH_HOME", str(home))
    scenario = tmp_path / "escalating.yaml"
    scenario.write_text(
        ESCALATING.format(
            policy=ROOT / "policies" / "procurement-agent-v2.yaml", examples=ROOT / "examples"
        )
    )

    def govmesh(*args: str) -> subprocess.CompletedProcess[str]:
        return _govmesh(list(args), home, mark, tmp_path)

    ran = govmesh("run", str(scenario), "-n", "2", "--seed", "4", "--json", "run.json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    ran_report = json.loads((tmp_path / "run.json").read_text())
    run_id = ran_report["run_id"]
    # Every message of the run passed the audit's verification; none was refused.
    assert (ran_report["audit"]["refused"], ran_report["audit"]["intact"]) == (0, True)
    workflow = f"{run_id}-00000"
    assert f"govmesh audit show {workflow} --run {run_id}" in ran.stderr
    assert (record_dir(run_id) / "run.json").exists()
    assert not (home / "runs" / run_id).exists(), "only the record is kept"
    resumed = govmesh("run", "--resume", run_id)
    assert resumed.returncode == 1 and "finished" in resumed.stderr, resumed.stderr

    listed = govmesh("audit", "runs", "--json", "runs.json")
    assert listed.returncode == 0, listed.stderr
    [run] = json.loads((tmp_path / "runs.json").read_text())
    assert (run["run_id"], run["tenant"], run["workflows"]) == (run_id, "approvals-cli", 2)
    assert run["refused"] == 0
    assert run["finished_at"] >= run["started_at"] > 0

    # No --run: the latest kept run, said on stderr.
    shown = govmesh("audit", "show", workflow, "--json", "show.json")
    assert shown.returncode == 0, shown.stderr
    assert f"the latest finished run kept {run_id}" in shown.stderr
    trace = json.loads((tmp_path / "show.json").read_text())
    cost = trace["cost"]
    usage_ids = [r[2] for r in trace["records"] if r[3] == "Usage"]  # array-like records
    assert [c["id"] for c in cost["calls"]] == usage_ids and cost["model_calls"] >= 2
    assert all(c["cost_usd"] > 0 for c in cost["calls"]) and cost["unpriced"] == 0
    assert cost["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in cost["calls"]))
    assert cost["cost_usd"] == pytest.approx(cost["counted_usd"])
    assert f"${cost['cost_usd']:,.6f}" in shown.stdout

    verified = govmesh("audit", "verify", "--run", run_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "checked" in verified.stdout  # the audit actor signed a last checkpoint

    exported = govmesh("audit", "export", workflow, "--run", run_id, "--out", "bundle.json")
    assert exported.returncode == 0, exported.stderr
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert bundle["format"] == "govmesh-evidence-bundle/1"
    assert bundle["workflow"] == workflow
    assert bundle["source"]["tenant"] == "approvals-cli"
    assert bundle["source"]["run"]["run_id"] == run_id
    events = bundle["events"]
    assert [e["id"] for e in events] == [r[2] for r in trace["records"]]
    assert [e["prev"] for e in events[1:]] == [e["hash"] for e in events[:-1]]
    assert bundle["period"]["first_event"] == events[0]["ts"]
    [decision] = bundle["decisions"]
    assert decision["outcome"] == "escalate"
    assert decision["replay"] == "same outcome and reasons"
    assert decision["obligations"] and decision["reasons"]
    [policy] = bundle["policies"]
    assert policy["policy_hash"] == decision["policy_hash"]
    assert (
        policy["texts_compile_to_hash"]
        and "procurement-agent-v2" in (policy["sources"][0]["source"])
    )
    [approval] = bundle["approvals"]
    assert approval["by"] == "sim-approver" and approval["operator"] == "operator-sim-approver"
    assert set(approval["shown"]) == {"vendor", "amount_usd"}, "what the tool declares to show"
    outcome = bundle["outcome"]
    assert (outcome["first_decision"], outcome["tool"]) == ("escalate", "erp.create_purchase_order")
    assert outcome["fields"]["vendor"] == approval["shown"]["vendor"]
    proof = approval["proof"]
    assert proof["signature_valid"] and proof["matches_answer"]
    assert proof["token_claims"]["role"] == "operator" and len(proof["operator_key"]) == 64
    assert bundle["costs"]["cost_usd"] == pytest.approx(cost["cost_usd"])
    integrity = bundle["integrity"]
    assert integrity["verify"]["ok"] and integrity["checkpoint"]["signature_valid"]
    assert integrity["checkpoint"]["workflow_head"]["seq"] == len(events)
    # A reviewer recomputes the digest with nothing but the standard library.
    content = {k: v for k, v in bundle.items() if k != "digest"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert bundle["digest"]["value"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert bundle_digest({**bundle, "workflow": "another"}) != bundle["digest"]["value"]

    # A record removed from the kept run is found by verify and by export.
    with open_kept(kept_run(run_id)) as url:

        async def remove_one() -> None:
            r = aioredis.Redis.from_url(url)
            try:
                index = AuditIndex(r, prefix=key_prefix("approvals-cli"))
                raw = await r.lindex(index.chain_key(workflow), 2)
                await r.lrem(index.chain_key(workflow), 1, raw)
            finally:
                await r.aclose()

        asyncio.run(remove_one())
    tampered = govmesh("audit", "verify", workflow, "--run", run_id)
    assert tampered.returncode == 1 and "removed" in tampered.stdout, tampered.stdout
    again = govmesh("audit", "export", workflow, "--out", "tampered.json")
    assert again.returncode == 1
    problems = json.loads((tmp_path / "tampered.json").read_text())["integrity"]["verify"]
    assert [(p["seq"], p["what"]) for p in problems["problems"]] == [(3, "removed")]
    assert processes_with_marker(mark) == [], "every audit command stopped its Valkey"


class _Sealer:
    """Seals events of one tenant at a chosen time, as the bus would have sent them."""

    def __init__(self, tenant: str) -> None:
        self.issuer = Issuer(name=f"test:{tenant}", audience=f"govmesh:{tenant}")
        self.coordinator = self.issuer.identity("coordinator-1", "coordinator")
        self.buyer = self.issuer.identity("buyer-1", "agent")
        self.negotiator = self.issuer.identity("negotiator-1", "agent")
        self.subjects = Subjects(tenant)
        self.codec = Codec()

    def workflow(self, workflow: str, *, at: float, ended: bool) -> list[Envelope]:
        """The coordinator starts ``workflow`` at the buyer, which asks a negotiator to take
        part and hears back; with ``ended``, the buyer then tells the coordinator."""
        start = WorkflowStart(kind="Offer", body=msgspec.msgpack.encode({"price": 10}))
        sent = [
            (self.coordinator, self.subjects.msg("buyer-1"), start),
            (self.buyer, self.subjects.msg("negotiator-1"), start),
            (self.negotiator, self.subjects.msg("buyer-1"), Outcome(result="completed")),
        ]
        if ended:
            sent.append((self.buyer, self.subjects.msg("coordinator-1"), Outcome(result="denied")))
        return [
            self.codec.seal(identity, subject=subject, body=body, workflow=workflow, now=at + i)[0]
            for i, (identity, subject, body) in enumerate(sent)
        ]


def _decision(workflow: str) -> DecisionRecord:
    return DecisionRecord(
        intent_id=uuid.uuid4().hex,
        intent=Intent(agent="p", role="r", tool="t", args={}, workflow=workflow, step=1),
        context=EvalContext(now=0.0),
        policy_hash="h",
        outcome="deny",
        reasons=("no",),
        decided_by="governance-1",
    )


def _approval(workflow: str) -> ApprovalRecord:
    return ApprovalRecord(
        approval_id=uuid.uuid4().hex,
        workflow=workflow,
        agent="p",
        tool="t",
        args={},
        intent_hash="ih",
        requested_at=0.0,
        answer=Answer(approved=False, by="alice"),
        outcome="deny",
        reasons=("rejected by alice",),
        settled_at=1.0,
    )


def test_prune_removes_old_ended_workflows_and_verify_still_finds_a_tamper(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    now = time.time()
    old, ended = now - 40 * DAY, {"wf-old-done", "wf-new-done", "wf-new-too"}
    ages = {"wf-old-done": old, "wf-old-open": old, "wf-new-done": now, "wf-new-too": now}
    sealer, key, p = _Sealer(prefix), SigningKey(), key_prefix(prefix)

    async def fill() -> None:
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            index = AuditIndex(r, prefix=p)
            for wf, at in ages.items():
                await index.append(sealer.workflow(wf, at=at, ended=wf in ended))
                await r.xadd(decisions_key(p), {"record": msgspec.msgpack.encode(_decision(wf))})
                await ApprovalStore(r, p).finish(_approval(wf))
                for k in workflow_spend_keys(p, wf):
                    await r.hset(k, "cost_usd", "0.5")
            await index.refuse(
                RefusedMessage(seq=seq, stored_at=at, subject=f"gm.{prefix}.security", reason="x")
                for seq, at in ((1, old), (2, now))
            )
            await index.checkpoint(key, signer="auditor")
        finally:
            await r.aclose()

    asyncio.run(fill())
    runner = CliRunner()
    where = ["--redis-url", redis_server.url, "--tenant", prefix]
    dry = runner.invoke(cli, ["audit", "prune", "--older-than", "30d", "--dry-run", *where])
    assert dry.exit_code == 0 and "would remove 1 ended workflows" in dry.output, dry.output
    report = tmp_path / "prune.json"
    pruned = runner.invoke(
        cli, ["audit", "prune", "--older-than", "30d", *where, "--json", str(report)]
    )
    assert pruned.exit_code == 0 and "removed 1 ended workflows" in pruned.output, pruned.output
    done = json.loads(report.read_text())
    assert (done["workflows"], done["decisions"], done["approvals"]) == (["wf-old-done"], 1, 1)
    assert done["refused"] == 1 and "and 1 refused messages" in pruned.output

    async def after() -> None:
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            index = AuditIndex(r, prefix=p)
            assert not await index.records("wf-old-done")
            assert [m.seq for m in await index.refused()] == [2], "the newer one is kept"
            # An agent's answer to another that asked it does not end the workflow.
            assert len(await index.records("wf-old-open")) == 3, "not ended: kept"
            entries = await r.xrange(decisions_key(p))
            kept = {msgspec.msgpack.decode(f[b"record"])["intent"]["workflow"] for _, f in entries}
            assert kept == set(ages) - {"wf-old-done"}
            approvals = {a.workflow for a in await ApprovalStore(r, p).settled()}
            assert approvals == set(ages) - {"wf-old-done"}
            assert not await r.exists(*workflow_spend_keys(p, "wf-old-done"))
            assert await r.exists(*workflow_spend_keys(p, "wf-new-done")) == 2

            # The checkpoint taken before the prune saw the pruned chain: not a problem.
            report = await index.verify(trusted=[key.public])
            assert report.ok, report.problems
            assert (report.pruned, report.workflows) == (1, 3)
            one = await index.verify("wf-old-done", trusted=[key.public])
            assert one.ok and one.pruned == 1
            # A single record deleted from a chain that was not pruned is still reported.
            chain = index.chain_key("wf-new-done")
            await r.lrem(chain, 1, await r.lindex(chain, 1))
            report = await index.verify(trusted=[key.public])
            assert [(x.workflow, x.seq, x.what) for x in report.problems] == [
                ("wf-new-done", 2, "removed")
            ]
            again = await prune_index(r, prefix=p, older_than_s=30 * DAY)
            assert again.workflows == [], "a pruned workflow is not pruned twice"
        finally:
            await r.aclose()

    asyncio.run(after())


def test_prune_removes_kept_runs_older_than_the_duration_and_logs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOVMESH_HOME", str(tmp_path))
    now = time.time()
    manifests = {
        run_id: RunManifest(
            run_id=run_id,
            scenario="s.yaml",
            seed=1,
            workflows=3,
            concurrency=1,
            tenant="acme",
            started_at=finished - 60,
            finished_at=finished,
        )
        for run_id, finished in (("old00001", now - 45 * DAY), ("new00001", now - DAY))
    }
    for run_id, manifest in manifests.items():
        (record_dir(run_id) / "redis").mkdir(parents=True)
        save_manifest(record_dir(run_id), manifest)

    assert [m.run_id for m in prune_kept(30 * DAY, now=now, dry_run=True)] == ["old00001"]
    assert record_dir("old00001").exists()
    assert [m.run_id for m in prune_kept(30 * DAY, now=now)] == ["old00001"]
    assert not record_dir("old00001").exists() and record_dir("new00001").exists()
    [logged] = (tmp_path / "records" / "prune.log").read_text().splitlines()
    assert json.loads(logged) == {
        "pruned_at": now,
        "older_than_s": 30 * DAY,
        **msgspec.to_builtins(manifests["old00001"]),
    }
    assert kept_run(None).run_id == "new00001"
    with pytest.raises(ConfigError, match="'old00001'"):
        kept_run("old00001")


def test_durations_read_as_seconds_and_bad_ones_are_named() -> None:
    assert [parse_duration(t) for t in ("30d", "12h", "90m", "45s", "2w", "1.5d")] == [
        30 * DAY,
        12 * 3600,
        90 * 60,
        45,
        14 * DAY,
        1.5 * DAY,
    ]
    with pytest.raises(ConfigError, match="'30 days'"):
        parse_duration("30 days")
