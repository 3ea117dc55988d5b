"""``govmesh audit``: replay, show, verify, export and prune the audit trail."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from govmesh.cli._common import console, glance, json_option, out, run_async, write_json
from govmesh.cli._root import cli
from govmesh.errors import GovmeshError


@cli.group()
def audit() -> None:
    """Check what was decided: in a running deployment (--redis-url, --tenant) or in the
    record a finished `govmesh run` kept (--run RUN_ID; default the latest)."""


def audit_source(f: Any) -> Any:
    """The options that say whose records an audit command reads (see `audit_target`)."""
    # Decorators apply bottom-up; reversed, --help lists them in this order.
    for option in reversed(
        (
            click.option(
                "--run",
                "run_id",
                metavar="RUN_ID",
                help="A finished run's kept record (default: the latest, unless --redis-url).",
            ),
            click.option(
                "--redis-url",
                envvar="GOVMESH_REDIS_URL",
                help="A deployment's Redis (default: $GOVMESH_REDIS_URL); needs --tenant.",
            ),
            click.option("--tenant", help="The tenant (default with --run: the run's)."),
        )
    ):
        f = option(f)
    return f


def _audit_call(run_id: str | None, redis_url: str | None, tenant: str | None, call: Any) -> Any:
    """Run ``call(index, target)`` on the audit index the options name (`AuditTarget`);
    returns its result and the target. A kept run's server runs only while ``call`` does."""
    import redis.asyncio as aioredis

    from govmesh.observability import AuditIndex
    from govmesh.scenarios._records import audit_target

    async def go(target: Any) -> Any:
        r = aioredis.Redis.from_url(target.redis_url)
        try:
            return await call(AuditIndex(r, prefix=target.prefix), target)
        finally:
            await r.aclose()

    try:
        with audit_target(run_id=run_id, redis_url=redis_url, tenant=tenant) as target:
            if target.run is not None:
                how = "the latest finished run kept" if target.latest else "kept run"
                console.print(f"{how} [bold]{target.run.run_id}[/] ({target.tenant})")
            return run_async(go(target)), target
    except GovmeshError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


@audit.command("replay")
@audit_source
@json_option
def audit_replay(
    run_id: str | None, redis_url: str | None, tenant: str | None, json_path: Path | None
) -> None:
    """Decide every recorded policy decision again, under the policy version and inputs it
    was decided with, and report any difference. Exits 1 if there is one."""
    from govmesh.governance._replay import replay

    report, target = _audit_call(
        run_id, redis_url, tenant, lambda index, _: replay(index.redis, prefix=index.prefix)
    )
    table = Table(title=f"govmesh audit replay: {target.tenant}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("decisions replayed", f"{report.decisions:,}")
    table.add_row("same outcome and reasons", f"{report.matched:,}")
    table.add_row("of which denied under contention", f"{report.contended:,}")
    table.add_row("policy versions", str(report.policy_versions))
    table.add_row("differences", str(len(report.mismatches)))
    out.print(table)
    for m in report.mismatches:
        console.print(f"[red]difference[/] {m}")
    write_json(json_path, report)
    if report.matched != report.decisions:
        sys.exit(1)


@audit.command("show")
@click.argument("workflow")
@audit_source
@json_option
def audit_show(
    workflow: str,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    json_path: Path | None,
) -> None:
    """Print WORKFLOW's causal trace from the audit index: who asked, what was decided under
    which policy, what ran and what each model call cost. Each event shows a few fields of
    its kind, then what user code declared: a start's payload, the arguments a tool
    declares to show (approval requests, outcomes), a tool's result and a handler's return
    value, by name."""

    from rich.markup import escape
    from rich.tree import Tree

    from govmesh.observability._audit import in_summary_order
    from govmesh.observability._export import costed_trace

    trace, _ = _audit_call(
        run_id, redis_url, tenant, lambda index, _: costed_trace(index, workflow)
    )
    if not trace.records:
        console.print(f"[yellow]no events of workflow {workflow!r} in the audit index[/]")
    by_id = {r.id: r for r in trace.records}
    cost = trace.cost
    costs = {c.id: c.cost_usd for c in cost.calls if c.cost_usd is not None}
    unpriced = f", {cost.unpriced} calls without a recorded cost" if cost.unpriced else ""
    tree = Tree(
        f"[bold]{escape(workflow)}[/]: {len(trace.records)} events; {cost.model_calls} model "
        f"calls, {cost.input_tokens + cost.output_tokens:,} tokens, "
        f"[bold]${cost.cost_usd:,.6f}[/]{unpriced}"
    )

    def add(parent: Tree, record_id: str) -> None:
        r = by_id[record_id]
        when = time.strftime("%H:%M:%S", time.localtime(r.ts))
        spent = f" [green]${costs[r.id]:,.6f}[/]" if r.id in costs else ""
        fields = glance(in_summary_order(r.kind, r.summary))
        node = parent.add(
            f"[dim]#{r.seq} {when}[/] [bold]{escape(r.kind)}[/] from [cyan]"
            f"{escape(r.sender)}[/] {escape(fields)}{spent}"
        )
        for child in trace.children.get(record_id, ()):
            add(node, child)

    for root in trace.roots:
        add(tree, root)
    out.print(tree)
    if trace.refused:
        out.print(
            f"[bold red]{len(trace.refused)} messages that claimed {escape(workflow)} were "
            "refused[/] (security events, not part of the trace):"
        )
        for m in trace.refused:
            out.print(_refused_line(m), highlight=False, soft_wrap=True)
    write_json(json_path, trace, what="trace")


def _refused_line(m: Any) -> str:
    """A `RefusedMessage` on one line of rich markup; what it claimed is escaped."""
    from rich.markup import escape

    when = time.strftime("%H:%M:%S", time.localtime(m.stored_at))
    claimed = " ".join(
        f"{name}={escape(value)}"
        for name, value in (("kind", m.kind), ("sender", m.claimed_sender), ("id", m.id))
        if value
    )
    return (
        f"[dim]stream #{m.seq} {when}[/] [red]{escape(m.reason)}[/] on {escape(m.subject)}"
        f" claimed {claimed or 'nothing readable'}: {escape(m.detail)}"
    )


@audit.command("verify")
@click.argument("workflow", required=False)
@audit_source
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    help="Hex Ed25519 public key checkpoints must be signed with (repeatable).",
)
@json_option
def audit_verify(
    workflow: str | None,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    trusted_keys: tuple[str, ...],
    json_path: Path | None,
) -> None:
    """Check the hash chain of WORKFLOW (default: every workflow) and the last signed
    checkpoint; list each changed, removed, reordered, inserted or truncated record.
    Workflows removed by `audit prune` are counted, not reported; so are messages of the
    stream the index refused (forged, replayed, malformed: security events kept out of
    every chain; for WORKFLOW, those that claimed it). Exits 1 on a problem."""
    from govmesh.identity import VerifyKey

    try:
        trusted = [VerifyKey(bytes.fromhex(k)) for k in trusted_keys]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--trusted-key") from None
    report, target = _audit_call(
        run_id, redis_url, tenant, lambda index, _: index.verify(workflow, trusted=trusted)
    )
    table = Table(
        title=f"govmesh audit verify: {target.tenant}" + (f" {workflow}" if workflow else "")
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("workflows checked", f"{report.workflows:,}")
    table.add_row("records checked", f"{report.records:,}")
    table.add_row("workflows pruned by retention", f"{report.pruned:,}")
    table.add_row("signed checkpoint", "none" if not report.checkpoint_ts else "checked")
    table.add_row(
        "messages refused, kept apart",
        ", ".join(f"{reason} {n}" for reason, n in report.refused_reasons.items()) or "0",
    )
    table.add_row("problems", str(len(report.problems)))
    out.print(table)
    for p in report.problems:
        out.print(f"[red]{p.what}[/] workflow {p.workflow!r} seq {p.seq}: {p.detail}")
    write_json(json_path, report)
    if report.problems:
        sys.exit(1)


@audit.command("export")
@click.argument("workflow")
@audit_source
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the bundle [default: evidence-WORKFLOW.json].",
)
def audit_export(
    workflow: str,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    out_path: Path | None,
) -> None:
    """Write WORKFLOW's evidence bundle: one JSON file with every event and its chain hash,
    how the workflow ended (result, first decision, tool, the arguments the tool declares
    to show and the return value's fields), the decisions with their policy hashes and
    texts, approvals with what they showed, who answered, why and their signature, model
    costs, the chain's verify result and the latest signed checkpoint, the messages that
    claimed WORKFLOW but were refused (security events, apart from the events), and a
    sha256 digest of the rest. Exits 1 if the chain has a problem (the
    bundle says which) or holds no event (then no bundle is written)."""
    from rich.markup import escape

    from govmesh.observability._export import bundle_digest, export_bundle

    bundle, _ = _audit_call(
        run_id,
        redis_url,
        tenant,
        lambda index, target: export_bundle(
            index.redis,
            tenant=target.tenant,
            prefix=index.prefix,
            workflow=workflow,
            source=target.source,
        ),
    )
    if not (bundle["events"] or bundle["pruned"]):
        console.print(f"[red]error:[/] no events of workflow {workflow!r} in the audit index")
        sys.exit(1)
    write_json(out_path or Path(f"evidence-{workflow}.json"), bundle, what="evidence bundle")
    integrity = bundle["integrity"]["verify"]
    end = bundle["outcome"]
    ended = "no end recorded" if end is None else f"ended {escape(str(end['result']))}"
    out.print(
        f"{len(bundle['events'])} events, {len(bundle['decisions'])} decisions, "
        f"{len(bundle['approvals'])} approvals, ${bundle['costs']['cost_usd']:,.6f} of model "
        f"calls; {ended}; chain "
        + ("intact" if integrity["ok"] else f"[red]{len(integrity['problems'])} problems[/]")
        + (
            f"; [red]{len(bundle['refused'])} refused messages[/] kept apart"
            if bundle["refused"]
            else ""
        )
        + f"; sha256 {bundle_digest(bundle)}"
    )
    if not integrity["ok"]:
        sys.exit(1)


@audit.command("prune")
@click.option(
    "--older-than",
    required=True,
    metavar="DURATION",
    help="Age such as 30d, 12h or 2w: remove what ended longer ago than that.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@audit_source
@json_option
def audit_prune(
    older_than: str,
    dry_run: bool,
    run_id: str | None,
    redis_url: str | None,
    tenant: str | None,
    json_path: Path | None,
) -> None:
    """Retention. With --redis-url (or --run): remove from that audit index the workflows
    that ended and whose latest event is older than DURATION, with their decision records,
    approvals and spend; each leaves a prune mark, so `audit verify` counts it as pruned,
    not as tampering; and the refused messages older than DURATION. Without either: remove
    the kept runs that finished longer ago than DURATION, each listed in
    $GOVMESH_HOME/records/prune.log first."""

    from govmesh.observability._export import prune_index
    from govmesh.scenarios._records import parse_duration, prune_kept

    try:
        seconds = parse_duration(older_than)
    except GovmeshError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    verb = "would remove" if dry_run else "removed"
    if run_id is None and not redis_url:
        try:
            runs = prune_kept(seconds, now=time.time(), dry_run=dry_run)
        except GovmeshError as exc:
            console.print(f"[red]error:[/] {exc}")
            sys.exit(2)
        for m in runs:
            out.print(
                f"{verb} kept run {m.run_id} ({Path(m.scenario).name}, {m.workflows} workflows)"
            )
        out.print(f"{verb} {len(runs)} kept runs older than {older_than}")
        write_json(json_path, runs)
        return
    report, _ = _audit_call(
        run_id,
        redis_url,
        tenant,
        lambda index, _: prune_index(
            index.redis, prefix=index.prefix, older_than_s=seconds, dry_run=dry_run
        ),
    )
    out.print(
        f"{verb} {len(report.workflows)} ended workflows older than {older_than}, "
        f"with {report.decisions} decision records and {report.approvals} approvals, "
        f"and {report.refused} refused messages stored before then"
    )
    write_json(json_path, report)


@audit.command("runs")
@json_option
def audit_runs(json_path: Path | None) -> None:
    """List the finished runs whose records are kept under $GOVMESH_HOME/records, with the
    messages the audit refused in each (`audit verify --run RUN_ID` says why)."""

    from govmesh.scenarios._records import kept_runs

    runs = kept_runs()
    table = Table(title=f"kept runs: {len(runs)}")
    for column in ("run", "scenario", "tenant", "started", "finished", "workflows", "refused"):
        table.add_column(column, justify="right" if column in ("workflows", "refused") else "left")
    for m in runs:
        table.add_row(
            m.run_id,
            Path(m.scenario).name,
            m.tenant,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(m.started_at)),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(m.finished_at)),
            str(m.workflows),
            f"[red]{m.refused}[/]" if m.refused else "0",
        )
    out.print(table)
    write_json(json_path, runs, what="list")
