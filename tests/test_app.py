"""The README's "Write your own governed agent", run exactly as written: a script with its
own agent, tool and policy, run with ``app.run()`` on embedded services, its classes
imported by every actor from the script's own folder."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SECTION = "## Write your own governed agent"


def _example() -> tuple[str, str, int]:
    """The section's policy (YAML), its script (Python), and how many lines they take."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    (policy,) = re.findall(r"```yaml\n(.*?)```", section.split("### ", 1)[0], re.S)
    (script,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return policy, script, len(policy.splitlines()) + len(script.splitlines())


def test_the_readme_example_is_short_and_imports_nothing_but_govmesh() -> None:
    _, script, lines = _example()
    assert lines <= 56, lines
    imported = {
        name.split(".")[0]
        for node in ast.walk(ast.parse(script))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        )
    }
    assert imported == {"govmesh", "msgspec"}


def test_the_readme_example_runs_its_own_classes_on_embedded_services(tmp_path: Path) -> None:
    policy, script, _ = _example()
    (tmp_path / "policy.yaml").write_text(policy)
    (tmp_path / "claims.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOVMESH_", "RAY_"))}
    env["GOVMESH_HOME"] = str(tmp_path / "home")
    ran = subprocess.run(
        [sys.executable, "claims.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert ran.returncode == 0, ran.stderr[-3000:]
    printed = ran.stdout.strip().splitlines()[-1]
    # What the example's last comment says it prints.
    promised = script.strip().splitlines()[-1].split("#", 1)[1].strip()
    assert ast.literal_eval(printed) == ast.literal_eval(promised) == {"completed": 2, "denied": 2}
    (record,) = (tmp_path / "home" / "records").iterdir()  # the run kept its audit record
    assert (record / "run.json").exists()
