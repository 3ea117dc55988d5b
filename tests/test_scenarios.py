"""Scenario files and apps: any agents, tools and workload, named by path or by an installed
plugin; every mistake named by file and field path, with the bad value quoted."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

import govmesh
from govmesh.errors import ConfigError, ScenarioError
from govmesh.scenarios import installed_plugins, load_app, scenario_app

from _userapp import write_notes

ROOT = Path(__file__).parent.parent

SCENARIO = """
name: notes
tenant: notes
policies: [policy.yaml]
path: [code]
model: {name: simulated-small}
prices:
  simulated-small: {input_per_1k: 0.003, output_per_1k: 0.015}
agents:
  - id: scribe-1
    class: notes:Scribe
    entry: true
    options: {margin: 2}
tools: [notes:write_note]
workload:
  generator: notes:Notes
  options: {pages: 3}
"""


@pytest.fixture
def user_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder of user code (module ``notes``), and a scenario file beside it."""
    code = write_notes(tmp_path)
    (tmp_path / "scenario.yaml").write_text(SCENARIO)
    monkeypatch.delitem(sys.modules, "notes", raising=False)
    yield tmp_path
    sys.modules.pop("notes", None)
    while str(code) in sys.path:
        sys.path.remove(str(code))


def _write(folder: Path, text: str) -> Path:
    path = folder / "scenario.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_scenario_names_its_agents_tools_and_workload_by_path(user_code: Path) -> None:
    app = scenario_app(user_code / "scenario.yaml")

    [scribe] = app.agents
    assert (scribe.id, scribe.role, scribe.entry) == ("scribe-1", "Scribe", True)
    assert scribe.ref == "notes:Scribe" and dict(scribe.options) == {"margin": 2}
    assert scribe.capabilities == ("notes.write",)  # the class's tools by default
    assert app.tool_refs() == ["notes:write_note"]
    assert str(user_code / "code") in app.search_path
    starts = app.starts(3, seed=7)
    assert starts == app.starts(3, seed=7)
    notes = [msgspec.msgpack.decode(s.body) for s in starts]
    assert notes == [{"text": f"note 7-{i}", "pages": 3} for i in range(3)]
    assert {s.kind for s in starts} == {"Note"}


def test_retries_of_model_and_tool_calls_are_set_for_the_scenario_and_per_agent(
    user_code: Path,
) -> None:
    # The defaults where neither the scenario nor the agent says.
    default = scenario_app(user_code / "scenario.yaml").agents[0]
    assert default.model_retry == default.tool_retry == govmesh.RetryPolicy()
    text = SCENARIO.replace(
        "tenant: notes",
        "tenant: notes\nmodel_retry: {maximum_attempts: 8, initial_s: 2}",
    ).replace("options: {margin: 2}", "options: {margin: 2}\n    tool_retry: {backoff: 3}")
    app = scenario_app(_write(user_code, text))

    [scribe] = app.agents
    assert scribe.model_retry == govmesh.RetryPolicy(maximum_attempts=8, initial_s=2)
    assert scribe.tool_retry == govmesh.RetryPolicy(backoff=3)


def test_inline_starts_are_converted_to_the_entry_handlers_type(user_code: Path) -> None:
    text = SCENARIO.replace(
        "  generator: notes:Notes\n  options: {pages: 3}\n",
        "  starts:\n    - {text: first}\n    - {text: second, pages: 4}\n",
    )
    app = scenario_app(_write(user_code, text))

    starts = [msgspec.msgpack.decode(s.body) for s in app.starts(3, seed=1)]
    assert starts == [
        {"text": "first", "pages": 1},
        {"text": "second", "pages": 4},
        {"text": "first", "pages": 1},
    ]


@pytest.mark.parametrize(
    ("change", "field", "quoted"),
    [
        (
            ("options: {margin: 2}", "options: {margin: 2}\n    budget_usd: lots"),
            "agents[0].budget_usd",
            "'lots'",
        ),
        (("class: notes:Scribe", "class: notes:Scrivener"), "agents[0].class", "'notes:Scrivener'"),
        (
            ("class: notes:Scribe", "class: nowhere.agents:Scribe"),
            "agents[0].class",
            "'nowhere.agents:Scribe'",
        ),
        (("tools: [notes:write_note]", "tools: [notes:Note]"), "tools[0]", "'notes:Note'"),
        (("entry: true", "entry: false"), "agents", "none"),
        (("options: {margin: 2}", "options: {margins: 2}"), "agents[0].options", "margins"),
        (
            ("generator: notes:Notes", "generator: notes:Nothing"),
            "workload.generator",
            "'notes:Nothing'",
        ),
        (("options: {pages: 3}", "options: {pages: 3, colour: red}"), "workload.options", "colour"),
        (
            ("model: {name: simulated-small}", "model: {name: simulated-large}"),
            "model",
            "'simulated-large'",
        ),
        (("path: [code]", "path: [elsewhere]"), "path[0]", "elsewhere"),
        (("tenant: notes", "tenant: notes\nmystery: 1"), "mystery", "mystery"),
        (
            ("tenant: notes", "tenant: notes\nmodel_retry: {maximum_attempts: 0}"),
            "model_retry",
            "0",
        ),
        (
            ("options: {margin: 2}", "options: {margin: 2}\n    tool_retry: {tries: 3}"),
            "agents[0].tool_retry",
            "tries",
        ),
    ],
)
def test_a_mistake_is_named_by_file_and_field_path_with_its_value(
    user_code: Path, change: tuple[str, str], field: str, quoted: str
) -> None:
    old, new = change
    assert old in SCENARIO
    path = _write(user_code, SCENARIO.replace(old, new, 1))

    with pytest.raises(ScenarioError) as caught:
        scenario_app(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert field in message, message
    assert quoted in message, message
    assert "\n" not in message


def test_an_inline_start_of_the_wrong_shape_names_its_index_and_field(user_code: Path) -> None:
    text = SCENARIO.replace(
        "  generator: notes:Notes\n  options: {pages: 3}\n",
        "  starts:\n    - {text: fine}\n    - {text: bad, pages: many}\n",
    )
    path = _write(user_code, text)

    with pytest.raises(ScenarioError, match=r"workload\.starts\[1\]: pages: .*\(got 'many'\)"):
        scenario_app(path)


def test_a_bad_line_of_a_starts_file_is_named_by_file_and_line(user_code: Path) -> None:
    starts = user_code / "starts.jsonl"
    starts.write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": 3}\n')
    text = SCENARIO.replace(
        "  generator: notes:Notes\n  options: {pages: 3}\n", "  starts_file: starts.jsonl\n"
    )
    path = _write(user_code, text)

    with pytest.raises(ScenarioError, match=rf"{starts}:4: text: .*\(got 3\)"):
        scenario_app(path)
    starts.write_text('{"text": "one"}\n{"text": "two"\n')
    with pytest.raises(ScenarioError, match=rf"{starts}:2: not JSON"):
        scenario_app(path)
    starts.write_text('{"text": "one"}\n{"text": "two", "pages": 5}\n')
    app = scenario_app(path)
    assert [msgspec.msgpack.decode(s.body)["text"] for s in app.starts(3, seed=1)] == [
        "one",
        "two",
        "one",
    ]


def test_the_shipped_scenarios_load_with_their_examples() -> None:
    for name in ("procurement", "runaway", "expenses"):
        app = scenario_app(ROOT / "scenarios" / f"{name}.yaml")
        assert sum(m.entry for m in app.agents) == 1
        assert app.tools and all(t.name for t in app.tools)
        assert len(app.starts(5, seed=1)) == 5


def test_an_app_module_is_loaded_by_name_with_its_folder_on_the_path(user_code: Path) -> None:
    app = load_app("notes:app", app_dir=user_code / "code")

    assert isinstance(app, govmesh.App)
    assert app.agent_ids == ("scribe-1",) and app.entry.role == "Scribe"
    assert str(user_code / "code") in app.search_path  # so its actors import it too
    assert [msgspec.msgpack.decode(s.body)["pages"] for s in app.starts(2, seed=1)] == [2, 2]
    with pytest.raises(ConfigError, match=r"app 'notes:Note' is .*not a govmesh.App"):
        load_app("notes:Note", app_dir=user_code / "code")


def test_an_app_refuses_a_capability_its_gateway_does_not_run(user_code: Path) -> None:
    sys.path.insert(0, str(user_code / "code"))
    import notes  # type: ignore[import-not-found]

    with pytest.raises(ConfigError, match=r"agents\[0\]\.capabilities: 'notes.erase'"):
        govmesh.App(
            "bad",
            agents=[govmesh.AgentDef(agent=notes.Scribe, capabilities=["notes.erase"])],
            tools=[notes.write_note],
            prices={"simulated-small": {"input_per_1k": 0.003, "output_per_1k": 0.015}},
        )
    with pytest.raises(ConfigError, match=r"prices\.simulated-small: .*input_per_1k"):
        govmesh.App("bad", agents=[notes.Scribe], prices={"simulated-small": {"output_per_1k": 1}})


PLUGIN = """
import govmesh
from notes import Scribe, write_note

agents = [Scribe]
tools = [write_note]
"""


def test_an_installed_plugin_adds_agents_and_tools_scenarios_name(
    user_code: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = user_code / "site"
    (site / "notesplugin").mkdir(parents=True)
    (site / "notesplugin" / "__init__.py").write_text(PLUGIN)
    info = site / "notesplugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: notesplugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[govmesh.plugins]\nnotes = notesplugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(user_code / "code"))
    installed_plugins.cache_clear()
    try:
        plugins = installed_plugins()
        assert set(plugins.agents) >= {"notes.Scribe"} and "notes.write" in plugins.tools
        text = SCENARIO.replace("class: notes:Scribe", "class: notes.Scribe").replace(
            "tools: [notes:write_note]", "tools: [notes.write]"
        )
        app = scenario_app(_write(user_code, text))
        assert app.agents[0].cls is plugins.agents["notes.Scribe"]
        assert app.tools == (plugins.tools["notes.write"],)
        # What the actors load: the plugin's own module paths, which every worker imports.
        assert app.agents[0].ref == "notes:Scribe" and app.tool_refs() == ["notes:write_note"]

        wrong = _write(user_code, text.replace("class: notes.Scribe", "class: notes.Poet"))
        with pytest.raises(ScenarioError, match=r"agents\[0\]\.class: no installed plugin gives"):
            scenario_app(wrong)
    finally:
        installed_plugins.cache_clear()


def test_an_agent_may_have_a_model_made_by_a_factory_of_the_users(user_code: Path) -> None:
    text = SCENARIO.replace(
        "    options: {margin: 2}\n",
        "    options: {margin: 2}\n    model_factory: {factory: notes:thinker}\n",
    )
    app = scenario_app(_write(user_code, text))

    [scribe] = app.agents
    assert scribe.model_name() == "thinker"
    model = scribe.model_factory(seed=1)()  # what the scribe's actor calls
    assert isinstance(model, govmesh.SimulatedModel) and model.model == "simulated-small"

    wrong = text.replace("{factory: notes:thinker}", "{factory: notes:thinker, options: {t: 1}}")
    with pytest.raises(ScenarioError, match=r"agents\[0\]\.model_factory\.options: .*'t'"):
        scenario_app(_write(user_code, wrong))
    both = text.replace(
        "    model_factory:", "    model: {name: simulated-small}\n    model_factory:"
    )
    with pytest.raises(ScenarioError, match=r"agents\[0\]\.model_factory: give model or"):
        scenario_app(_write(user_code, both))
    none = SCENARIO.replace("model: {name: simulated-small}\n", "")
    with pytest.raises(ScenarioError, match=r"agents\[0\]\.model: no model here"):
        scenario_app(_write(user_code, none))


def test_a_scenario_in_the_format_before_apps_is_told_what_changed(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(
        "name: old\npolicies: []\nmodel: {name: simulated-small}\n"
        "agents:\n  requester: {id: requester-1, role: Requester}\n"
        "purchases: {items: [laptops], vendors: {Vendor_A: 1}, amount_usd: {min: 1, max: 2}}\n"
    )
    with pytest.raises(ScenarioError, match=rf"^{old}: agents: .*format before apps"):
        scenario_app(old)


def test_a_scenario_points_an_agent_at_a_real_model_whose_key_stays_in_the_environment(
    user_code: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SCENARIO.replace(
        "model: {name: simulated-small}",
        "model: {provider: openai, base_url: 'http://127.0.0.1:9/v1', model: smol,"
        " api_key_env: GOVMESH_TEST_SCENARIO_KEY}",
    ).replace("  simulated-small:", "  smol:")
    app = scenario_app(_write(user_code, real))

    [scribe] = app.agents
    assert isinstance(scribe.model, govmesh.OpenAISettings)
    assert (scribe.model_name(), scribe.model_provider()) == ("smol", "openai")
    make = scribe.model_factory(seed=1)  # what the scribe's actor calls, in its process
    monkeypatch.delenv("GOVMESH_TEST_SCENARIO_KEY", raising=False)
    with pytest.raises(ConfigError, match="'GOVMESH_TEST_SCENARIO_KEY' is not set"):
        make()
    monkeypatch.setenv("GOVMESH_TEST_SCENARIO_KEY", "sk-scenario")
    assert make().model == "smol"

    anthropic = real.replace("provider: openai", "provider: anthropic")
    assert scenario_app(_write(user_code, anthropic)).agents[0].model_provider() == "anthropic"
    with pytest.raises(ScenarioError, match=r"model: Object contains unknown field `api_key`"):
        scenario_app(_write(user_code, real.replace("model: smol,", "model: smol, api_key: sk-1,")))
    with pytest.raises(ScenarioError, match=r"model\.provider: Invalid value 'bedrock'"):
        scenario_app(_write(user_code, real.replace("provider: openai", "provider: bedrock")))
    unpriced = real.replace("  smol:", "  other:")
    with pytest.raises(ScenarioError, match="model: 'smol' has no entry under prices"):
        scenario_app(_write(user_code, unpriced))
