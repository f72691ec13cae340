"""What an install ships: every third-party package the code imports is declared, and the `/run-job` prompt has one
source, inside the package."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import vast_mcp

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vast_mcp"


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _declared() -> set[str]:
    """Distribution names a plain install brings in (no extras)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = set()
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names.add(_normalise(name))
    return names


def _imported_top_level() -> dict[str, Path]:
    """Top-level names of every absolute import in the package, with one file that imports each."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return found


def test_every_imported_package_is_a_declared_dependency() -> None:
    declared = _declared()
    owners = packages_distributions()
    missing = []
    for top, path in _imported_top_level().items():
        if top in sys.stdlib_module_names or top in ("__future__", "vast_mcp"):
            continue
        dists = {_normalise(d) for d in owners.get(top, [])}
        if not dists & declared:
            missing.append(f"{top} (imported in {path.relative_to(REPO)}; from {sorted(dists) or 'nothing installed'})")
    assert not missing, "imported but not in [project].dependencies: " + ", ".join(missing)


def test_the_prompt_has_one_source_inside_the_package() -> None:
    packaged = Path(vast_mcp.__file__).parent / "prompts" / "run-job.md"
    readable = REPO / "prompts" / "run-job.md"
    assert packaged.is_file() and not packaged.is_symlink()
    assert readable.is_symlink(), "prompts/run-job.md must link to the packaged prompt, not be a second copy"
    assert readable.resolve() == packaged.resolve()
    assert "{job}" in packaged.read_text(encoding="utf-8")
