"""The reference pages under ``docs/`` name everything users can type: every command of the
``govmesh`` CLI, every key of a scenario file and every key of the policy language; and
every relative link of the README and the pages leads to a file (and heading) that exists.

Each check is a function that returns what is missing, tested once on the real pages and
once on a page with something taken out, so none can pass by finding nothing to check.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import click
import pytest
from msgspec import inspect

from govmesh.cli import cli
from govmesh.errors import PolicyError
from govmesh.governance import parse_policy_text
from govmesh.scenarios._schema import Scenario

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)
_LINK = re.compile(r"\[(?:[^\]`]|`[^`]*`)*\]\(([^)\s]+)\)")
_TABLE_KEY = re.compile(r"^\| *([^|]*?) *\|", re.M)


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks, where ``#`` lines are not headings."""
    return _FENCE.sub("", text)


def command_paths(group: click.Group, prefix: str = "") -> list[str]:
    """Every command and subcommand under ``group``, as typed after ``govmesh``."""
    paths: list[str] = []
    for name, command in sorted(group.commands.items()):
        path = f"{prefix} {name}".strip()
        paths.append(path)
        if isinstance(command, click.Group):
            paths += command_paths(command, path)
    return paths


def missing_commands(paths: list[str], page: str) -> list[str]:
    """The commands of ``paths`` that have no heading `` `govmesh <path>` `` in ``page``."""
    headings = set(_HEADING.findall(_prose(page)))
    return [p for p in paths if f"`govmesh {p}`" not in headings]


def table_keys(page: str) -> set[str]:
    """The names in backticks in the first column of the page's tables: the keys a
    reference table documents."""
    return {
        key for cell in _TABLE_KEY.findall(_prose(page)) for key in re.findall(r"`([^`]+)`", cell)
    }


def scenario_keys() -> set[str]:
    """Every key a scenario file may hold, at any depth, by the name written in the file
    (``class``, not ``cls``), with the tag that picks a model's provider."""
    keys: set[str] = set()
    seen: set[type] = set()

    def walk(t: inspect.Type) -> None:
        match t:
            case inspect.StructType(cls=cls) if cls not in seen:
                seen.add(cls)
                if t.tag_field is not None:
                    keys.add(t.tag_field)
                for field in t.fields:
                    keys.add(field.encode_name)
                    walk(field.type)
            case inspect.UnionType(types=types):
                for member in types:
                    walk(member)
            case inspect.DictType(key_type=key, value_type=value):
                walk(key)
                walk(value)
            case inspect.VarTupleType(item_type=item) | inspect.ListType(item_type=item):
                walk(item)

    walk(inspect.type_info(Scenario))
    return keys


def _refusal(text: str) -> str:
    with pytest.raises(PolicyError) as refused:
        parse_policy_text(text)
    return str(refused.value)


def policy_keys() -> set[str]:
    """Every key the policy loader accepts, as it lists them when it refuses an unknown one:
    at the top, in a policy, in its ``rate_limit`` and in a condition."""
    top = _refusal("unknown_key: 1")
    keys = set(re.findall(r"'(\w+)'", top.split("expected", 1)[1]))
    for text in (
        "policy:\n  agent: A\n  unknown_key: 1\n",
        "policy:\n  agent: A\n  rate_limit: {calls: 1, per_seconds: 1, unknown_key: 1}\n",
        "policy:\n  agent: A\n  deny_if:\n    - {arg: a, over: 1, unknown_key: 1}\n",
    ):
        (allowed,) = re.findall(r"\(allowed: ([^)]*)\)", _refusal(text))
        keys |= {key.strip() for key in allowed.split(",")}
    return keys


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    """The anchors of the page's headings; a repeated heading gets ``-1``, ``-2``, ..."""
    found: set[str] = set()
    counts: Counter[str] = Counter()
    for heading in _HEADING.findall(_prose(page)):
        base = slug(heading)
        found.add(base if not counts[base] else f"{base}-{counts[base]}")
        counts[base] += 1
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or heading in it, does not exist."""
    broken: list[str] = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        missing_heading = (
            path.exists()
            and bool(anchor)
            and path.suffix == ".md"
            and anchor not in anchors(path.read_text())
        )
        if not path.exists() or missing_heading:
            broken.append(target)
    return broken


def test_every_command_has_a_section_in_the_cli_page() -> None:
    paths = command_paths(cli)
    assert {"run", "approvals list", "bench scale", "audit prune"} <= set(paths)
    assert missing_commands(paths, (DOCS / "cli.md").read_text()) == []


def test_a_command_the_cli_page_leaves_out_is_found_missing() -> None:
    page = (DOCS / "cli.md").read_text().replace("### `govmesh bench scale`", "### Scale")
    assert missing_commands(command_paths(cli), page) == ["bench scale"]


def test_every_scenario_key_is_in_a_table_of_the_scenarios_page() -> None:
    keys = scenario_keys()
    # The walk reaches nested structs: agents, model settings, retries, prices, budget.
    assert {"class", "provider", "api_key_env", "maximum_attempts", "input_per_1k"} <= keys
    assert {"soft_threshold", "prometheus_port", "workload", "starts_file", "mean"} <= keys
    assert keys - table_keys((DOCS / "scenarios.md").read_text()) == set()


def test_a_scenario_key_missing_from_the_tables_is_found() -> None:
    page = (DOCS / "scenarios.md").read_text()
    page = page.replace("| `reservation_ttl_s` |", "| reservation TTL |")
    assert scenario_keys() - table_keys(page) == {"reservation_ttl_s"}


def test_every_policy_key_the_loader_accepts_is_in_the_policies_page() -> None:
    keys = policy_keys()
    assert {"policy", "policies", "agent", "deny_if", "per_seconds", "matches"} <= keys
    assert keys - table_keys((DOCS / "policies.md").read_text()) == set()


def test_a_policy_key_missing_from_the_policies_page_is_found() -> None:
    page = (DOCS / "policies.md").read_text().replace("| `on_expiry` |", "| on expiry |")
    assert policy_keys() - table_keys(page) == {"on_expiry"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings_that_exist(page: Path) -> None:
    assert broken_links(page) == []


def test_a_link_to_a_missing_file_or_heading_is_found(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# There\n\n## `govmesh run`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#govmesh-run) [no file](gone.md) [no heading](there.md#elsewhere)\n"
        "```\n[in code](also-gone.md)\n```\n[web](https://example.com/x)\n"
    )
    assert broken_links(page) == ["gone.md", "there.md#elsewhere"]
