"""Ignore patterns: the matcher agrees with git and with the regular-expression matcher it replaced, and its work
stays bounded by the sizes of path and pattern, whatever the pattern (no catastrophic backtracking)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vast_mcp.remote.archive import scan
from vast_mcp.remote.patterns import STAR, IgnoreRules, SegmentGlob, compile_rule, greedy

SEGMENT_GLOBS = ["a", "b", "ab", "*", "?", "a*", "*b", "a?", "[ab]", "[!a]", "[a-b]*", "*a*", "**"]
NAMES = ["a", "b", "ab", "ba", "aab", "bb"]


def reference_regex(line: str) -> tuple[re.Pattern[str], bool, bool] | None:
    """The matcher this package used before: a translation to a backtracking regular expression (exponential on
    runs of `**/`, so only usable on small inputs). Classes cannot match `/`, as in git."""
    line = line.rstrip(" ")
    if not line.strip() or line.startswith("#"):
        return None
    negate = line.startswith("!")
    if negate:
        line = line[1:]
    dir_only = line.endswith("/")
    body = line.rstrip("/")
    anchored = "/" in body
    body = body.lstrip("/")
    if not body:
        return None
    out, i = [], 0
    while i < len(body):
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif body[i] == "*":
            out.append("[^/]*")
            i += 1
        elif body[i] == "?":
            out.append("[^/]")
            i += 1
        elif body[i] == "[":
            end = body.index("]", i + 2)
            inner = body[i + 1 : end]
            out.append("[^/" + inner[1:] + "]" if inner.startswith("!") else "[" + inner + "]")
            i = end + 1
        else:
            out.append(re.escape(body[i]))
            i += 1
    prefix = "" if anchored else "(?:.*/)?"
    return re.compile(f"^{prefix}{''.join(out)}$", re.S), negate, dir_only


def reference_ignored(lines: list[str], path: str, is_dir: bool) -> bool:
    verdict = False
    for line in lines:
        compiled = reference_regex(line)
        if compiled is None:
            continue
        regex, negate, dir_only = compiled
        if dir_only and not is_dir:
            continue
        if regex.match(path):
            verdict = not negate
    return verdict


@st.composite
def patterns(draw: st.DrawFn) -> str:
    segments = draw(st.lists(st.sampled_from(SEGMENT_GLOBS), min_size=1, max_size=4))
    body = "/".join(segments)
    lead = draw(st.sampled_from(["", "/", "!", "!/"]))
    trail = draw(st.sampled_from(["", "/"]))
    return lead + body + trail


paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=5).map("/".join)


@settings(max_examples=400, deadline=None)
@given(st.lists(patterns(), min_size=1, max_size=3), paths, st.booleans())
def test_agrees_with_the_regular_expression_matcher(lines: list[str], path: str, is_dir: bool) -> None:
    assert IgnoreRules.from_lines(lines).ignored(path, is_dir) == reference_ignored(lines, path, is_dir)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(patterns(), min_size=1, max_size=3), files=st.lists(paths, min_size=1, max_size=6))
def test_agrees_with_git_check_ignore(tmp_path: Path, lines: list[str], files: list[str]) -> None:
    """A tree on disk, the patterns as its .gitignore: git's verdict for every file and folder is ours, where a
    path below an ignored folder counts as ignored (the upload never looks inside one)."""
    repo = tmp_path / f"repo-{abs(hash((tuple(lines), tuple(files))))}"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    made: dict[str, bool] = {}
    for rel in sorted(files, key=len):
        parts = rel.split("/")
        if any(made.get("/".join(parts[:k])) is False for k in range(1, len(parts))) or rel in made:
            continue  # a file already sits where this path needs a folder
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
        made[rel] = False
        for k in range(1, len(parts)):
            made["/".join(parts[:k])] = True
    (repo / ".gitignore").write_text("\n".join(lines) + "\n")
    listing = "\0".join(made) + "\0"
    git = subprocess.run(
        ["git", "-C", str(repo), "check-ignore", "--no-index", "--stdin", "-z"],
        input=listing.encode(),
        capture_output=True,
        check=False,
    )
    theirs = {p for p in git.stdout.decode().split("\0") if p}
    rules = IgnoreRules.from_lines(lines)

    def ours(rel: str) -> bool:
        parts = rel.split("/")
        ancestors = ("/".join(parts[:k]) for k in range(1, len(parts)))
        return rules.ignored(rel, made[rel]) or any(rules.ignored(a, True) for a in ancestors)

    assert {p for p in made if ours(p)} == theirs, (lines, made)


ADVERSARIAL = [
    "**/" * 11 + "nomatch",
    "/" + "**/" * 30 + "x/**/" * 5 + "nomatch",
    "a/**/b/**/c/**/d/**/e/**/f/**/g/**/nomatch",
    "*a*a*a*a*a*a*a*a*a*a*a*a*b",
    "**/" + "*d*d*d*d*d*d*d*d*d*d*/" * 3 + "x",
]


@pytest.mark.parametrize("pattern", ADVERSARIAL)
def test_runs_of_double_stars_collapse_and_the_work_is_bounded(pattern: str) -> None:
    rule = compile_rule(pattern)
    assert rule is not None
    assert rule.size <= len(pattern) + 2
    if pattern.startswith("**/" * 11):
        assert rule.tokens[0] is STAR and len(rule.tokens) == 2, "eleven `**/` compile to one"
    for path in ["/".join(["d"] * 22) + "/f", "/".join(["a", "b", "c", "d", "e", "f", "g"] * 3), "a" * 250]:
        matched, steps = rule.match(path)
        assert not matched
        parts = path.split("/")
        tokens = [t for t in rule.tokens if isinstance(t, SegmentGlob)]
        inner = max((len(p) + 1) * (t.size + 2) for p in parts for t in tokens)
        assert steps <= (len(parts) + 1) * (len(rule.tokens) + 2) * (inner + 1), (pattern, path, steps)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(["*", "?", "a", "b", STAR]), max_size=30),
    st.text(alphabet="ab", max_size=60),
)
def test_greedy_wildcard_work_bound_and_agreement_with_a_regex(tokens: list[object], text: str) -> None:
    matched, steps = greedy(tokens, text, lambda t, c: t == "?" or t == c or t == "*")
    assert steps <= (len(text) + 1) * (len(tokens) + 2)
    regex = "".join(".*" if t is STAR else "." if t in ("?", "*") else re.escape(str(t)) for t in tokens)
    assert matched == (re.fullmatch(regex, text, re.S) is not None)


@pytest.mark.anyio
async def test_adversarial_patterns_on_a_deep_tree_finish_at_once(tmp_path: Path) -> None:
    """The case that took 40 s: a tree 22 levels deep, excluded with eleven `**/`, and a .gitignore with ten."""
    deep = tmp_path / "repo"
    folder = deep
    for level in range(22):
        folder = folder / f"d{level}"
    folder.mkdir(parents=True)
    (folder / "leaf.txt").write_text("x")
    (deep / ".gitignore").write_text("**/" * 10 + "nomatch\n" + "*a*a*a*a*a*a*a*a*a*a*a*b\n")
    excludes = ["**/" * 11 + "nomatch", "**/**/**/**/**/**/**/**/**/**/**/d5/**/**/**/nomatch"]
    with anyio.fail_after(60):  # only a catastrophic blow-up comes near this
        found = await anyio.to_thread.run_sync(
            lambda: scan([deep], excludes, use_gitignore=True), abandon_on_cancel=True
        )
    assert any(e.rel.endswith("leaf.txt") for e in found.entries)
    assert found.excluded == 0
