"""A user's own app, written to a folder outside govmesh and outside the tests' path, as a
user's project would be: module ``notes`` with an agent, a tool, a workload and an app."""

from __future__ import annotations

from pathlib import Path

NOTES = '''
"""A user's own agent, tool and workload, outside govmesh."""

import uuid

import msgspec

import govmesh


class Note(msgspec.Struct, frozen=True):
    text: str
    pages: int = 1


class Noted(msgspec.Struct, frozen=True):
    note_id: str


@govmesh.tool(name="notes.write", idempotent=True, show=("text",))
async def write_note(note: Note, ctx: govmesh.ToolContext) -> Noted:
    """Write a note, once per idempotency key."""
    noted = Noted(note_id=uuid.uuid4().hex)
    record = msgspec.json.encode({"workflow": ctx.workflow, "step": ctx.step, "id": noted.note_id})
    key = ctx.key("notes", "written")
    if not await ctx.redis.hsetnx(key, ctx.idempotency_key or noted.note_id, record):
        first = await ctx.redis.hget(key, ctx.idempotency_key)
        noted = Noted(note_id=msgspec.json.decode(first)["id"])
    return noted


@write_note.effects
async def notes_written(redis, key_prefix: str) -> list[govmesh.Effect]:
    """Every note written, as an effect of its workflow's step."""
    written = await redis.hvals(f"{key_prefix}:notes:written")
    return [msgspec.json.decode(raw, type=govmesh.Effect) for raw in written]


class Scribe(govmesh.Agent):
    """Writes notes."""

    role = "Scribe"
    tools = (write_note,)

    def __init__(self, *, margin: int = 0, dry_s: float = 0.0) -> None:
        self.margin = margin
        self.dry_s = dry_s

    @govmesh.handler
    async def take(self, wf: govmesh.Workflow, note: Note) -> Noted:
        await wf.think(f"Word the note {note.text!r}", key="word")
        noted = await wf.call_tool(write_note, note, step=1)
        if self.dry_s:
            await wf.sleep("ink", self.dry_s)  # a durable timer: a workflow stays in flight
        return noted


def thinker() -> govmesh.SimulatedModel:
    """The scribe's model: a factory of the user's own, called in the scribe's actor."""
    settings = govmesh.SimulatedModelSettings(error_probability=0.0)
    return govmesh.SimulatedModel(settings, seed=1)


class Notes:
    """Makes notes of {pages} pages."""

    def __init__(self, *, pages: int) -> None:
        self.pages = pages

    def starts(self, count: int, seed: int) -> list[Note]:
        return [Note(text=f"note {seed}-{i}", pages=self.pages) for i in range(count)]


app = govmesh.App(
    "notes",
    agents=[govmesh.AgentDef(agent=Scribe, options={"dry_s": 1.0})],
    tools=[write_note],
    model=thinker,
    policies=[POLICY],
    prices={"simulated-small": {"input_per_1k": 0.003, "output_per_1k": 0.015}},
    workload=Notes(pages=2),
)
'''

POLICY = """
policy:
  agent: Scribe
  allowed_tools: [notes.write]
  escalation: human_review
"""


def write_notes(folder: Path) -> Path:
    """Write ``policy.yaml`` to ``folder`` and module ``notes`` to ``folder/code``; returns
    the code folder."""
    (folder / "policy.yaml").write_text(POLICY)
    code = folder / "code"
    code.mkdir()
    (code / "notes.py").write_text(NOTES.replace("POLICY", repr(str(folder / "policy.yaml"))))
    return code
