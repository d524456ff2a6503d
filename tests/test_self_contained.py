"""Nothing in the repository reads outside it: a fresh clone anywhere passes `make test`.

Scans every file of the checkout (tracked, or untracked and not ignored) for paths that leave the repository:
`__file__`-relative paths that climb above the repository root (`parents[N]`, `.parent` chains,
`os.path.dirname`, `/ ".."`), relative `..` path literals in code, absolute paths of this machine, and
Markdown links that resolve outside the tree. Data that the tests need lives inside (the KubeRay CRD schema
is vendored in tests/deploy/schemas/kuberay/).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()

# Vendored upstream data: not ours to scan.
VENDORED = ("tests/deploy/schemas/",)
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".ico", ".gguf", ".safetensors", ".bin", ".pt", ".whl"}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist", "node_modules"}

# This workspace's absolute paths, and the sibling folder the CRD schema once came from.
FORBIDDEN_TEXT = [
    re.compile(r"(?<![\w.])/work/"),
    re.compile(r"\.\./shared\b"),
    re.compile(r"\bshared/schemas\b"),
]
PATH_CALLS = {"Path", "PurePath", "PosixPath", "PurePosixPath", "join", "open", "abspath", "realpath", "normpath"}
MD_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def repo_files() -> list[str]:
    """The checkout's files, relative to its root: git's view when there is one, else a walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT, capture_output=True, check=True,
        ).stdout.decode()
        files = [f for f in out.split("\0") if f and (REPO_ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(REPO_ROOT):
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [(Path(dirpath) / name).relative_to(REPO_ROOT).as_posix() for name in filenames]
    return sorted(
        f for f in files
        if not f.startswith(VENDORED) and PurePosixPath(f).suffix.lower() not in BINARY_SUFFIXES and f != THIS_FILE
    )


def _text(rel: str) -> str | None:
    try:
        return (REPO_ROOT / rel).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


# ------------------------------------------------------------------------------------------- python
def _climb(literal: str) -> tuple[int, int]:
    """(deepest climb, net climb) of a relative path literal: '../../a' -> (2, 1); 'docs/x' -> (0, -2)."""
    net = deepest = 0
    for part in PurePosixPath(literal).parts:
        if part == "..":
            net += 1
            deepest = max(deepest, net)
        elif part not in (".", "/"):
            net -= 1
    return deepest, net


class _PathEscapes(ast.NodeVisitor):
    """Finds path expressions that leave the repository, for one Python file at `rel`.

    A `__file__`-rooted expression is tracked as how many levels above the file it points (the file itself is 0,
    its folder 1); the repository root is `depth` levels up, so anything above that is outside. Names bound to
    such an expression (`REPO_ROOT = Path(__file__).resolve().parents[2]`) carry their level.
    """

    def __init__(self, rel: str):
        self.depth = len(PurePosixPath(rel).parts)
        self.names: dict[str, int] = {}
        self.found: dict[int, str] = {}  # line -> the smallest escaping expression on it

    @property
    def problems(self) -> list[str]:
        return [f"line {line}: {what}" for line, what in sorted(self.found.items())]

    def report(self, node: ast.AST, why: str) -> None:
        text = f"`{ast.unparse(node)}` {why}"
        if node.lineno not in self.found or len(text) < len(self.found[node.lineno]):
            self.found[node.lineno] = text

    def level(self, node: ast.AST) -> int | None:
        if isinstance(node, ast.Name):
            return 0 if node.id == "__file__" else self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            if node.attr == "parent":
                inner = self.level(node.value)
                return None if inner is None else inner + 1
            return None
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
            inner = self.level(node.value.value)
            index = node.slice
            if inner is None or not (isinstance(index, ast.Constant) and isinstance(index.value, int)):
                return None
            return inner + index.value + 1
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("resolve", "absolute", "expanduser") and isinstance(func, ast.Attribute):
                return self.level(func.value)
            if name == "dirname" and node.args:
                inner = self.level(node.args[0])
                return None if inner is None else inner + 1
            if name in ("Path", "PurePath", "PosixPath", "abspath", "realpath", "normpath", "join") and node.args:
                return self._joined(node.args)
            return None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return self._joined([node.left, node.right])
        return None

    def _joined(self, parts: list[ast.AST]) -> int | None:
        level = self.level(parts[0])
        if level is None:
            return None
        for part in parts[1:]:
            if not (isinstance(part, ast.Constant) and isinstance(part.value, str)):
                return None  # a computed component: stop tracking rather than guess
            deepest, net = _climb(part.value)
            if level + deepest > self.depth:
                return level + deepest
            level += net
        return level

    def check(self, node: ast.AST) -> None:
        level = self.level(node)
        if level is not None and level > self.depth:
            self.report(node, f"is {level - self.depth} level(s) above the repository root")

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        level = self.level(node.value)
        if level is not None:
            for target in node.targets:
                if isinstance(target, ast.Name):
                    self.names[target.id] = level

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        if node.value is not None and isinstance(node.target, ast.Name):
            level = self.level(node.value)
            if level is not None:
                self.names[node.target.id] = level

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.check(node)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        self.check(node)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        self.check(node)
        if isinstance(node.op, ast.Div):
            self._relative_literals([node.left, node.right], node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        self.check(node)
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in PATH_CALLS:
            self._relative_literals(node.args, node)
        self.generic_visit(node)

    def _relative_literals(self, parts: list[ast.AST], node: ast.AST) -> None:
        # '..' in a path that is not rooted at __file__ climbs from wherever the process happens to run.
        if self.level(node) is not None:
            return
        for part in parts:
            if isinstance(part, ast.Constant) and isinstance(part.value, str) and ".." in PurePosixPath(part.value).parts:
                self.report(node, "climbs out with '..'")


def python_escapes(rel: str, source: str) -> list[str]:
    finder = _PathEscapes(rel)
    finder.visit(ast.parse(source, filename=rel))
    return finder.problems


# ------------------------------------------------------------------------------------------- markdown
def markdown_escapes(rel: str, text: str) -> list[str]:
    problems = []
    base = (REPO_ROOT / rel).parent
    for lineno, line in enumerate(text.splitlines(), 1):
        for target in MD_LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target, re.I):
                continue  # a URL, an anchor, or a site-absolute link
            path = target.split("#", 1)[0]
            if path and not (base / path).resolve().is_relative_to(REPO_ROOT):
                problems.append(f"line {lineno}: link `{target}` points outside the repository")
    return problems


def escapes(rel: str) -> list[str]:
    text = _text(rel)
    if text is None:
        return []
    problems = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: `{m.group(0)}` is outside the repository"
        for pattern in FORBIDDEN_TEXT
        for m in pattern.finditer(text)
    ]
    if rel.endswith(".py"):
        problems += python_escapes(rel, text)
    elif rel.endswith(".md"):
        problems += markdown_escapes(rel, text)
    return problems


def test_nothing_reads_outside_the_repository():
    files = repo_files()
    assert any(f.endswith(".py") for f in files) and "pyproject.toml" in files, files[:20]
    found = {rel: problems for rel in files if (problems := escapes(rel))}
    assert not found, "paths outside the repository:\n" + "\n".join(
        f"  {rel}: {p}" for rel, problems in found.items() for p in problems
    )


def test_vendored_crd_schema_is_in_the_tree():
    schema_dir = REPO_ROOT / "tests" / "deploy" / "schemas" / "kuberay"
    assert (schema_dir / "ray.io_rayservices.yaml").is_file()
    notice = (schema_dir / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and "ray-project/kuberay" in notice


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("tests/deploy/kit.py", "from pathlib import Path\nX = Path(__file__).resolve().parents[3] / 'shared'\n"),
        ("tests/deploy/kit.py", "from pathlib import Path\nROOT = Path(__file__).resolve().parents[2]\nX = ROOT.parent\n"),
        ("tests/kit.py", "from pathlib import Path\nX = Path(__file__).parent.parent.parent\n"),
        ("tests/kit.py", "import os\nX = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))\n"),
        ("tests/kit.py", "from pathlib import Path\nX = Path(__file__).parent / '..' / '..' / 'shared'\n"),
        ("tests/kit.py", "from pathlib import Path\nX = Path('../outside/x.yaml')\n"),
        ("tests/kit.py", "import os\nX = os.path.join('data', '../../x')\n"),
    ],
)
def test_the_scan_catches_escapes(rel, source):
    assert python_escapes(rel, source), source


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("tests/deploy/kit.py", "from pathlib import Path\nROOT = Path(__file__).resolve().parents[2]\nX = ROOT / 'docs'\n"),
        ("benchmarks/common.py", "from pathlib import Path\nROOT = Path(__file__).resolve().parent.parent\n"),
        ("tests/deploy/kit.py", "from pathlib import Path\nX = Path(__file__).parent / '..' / 'unit'\n"),
        ("tests/kit.py", "NAME = '../etc/passwd'  # bad input for a validator, not a path we read\n"),
    ],
)
def test_the_scan_allows_paths_inside(rel, source):
    assert not python_escapes(rel, source), source


def test_the_scan_checks_markdown_links():
    assert markdown_escapes("helm/sinkserve/README.md", "see [deploy](../../deploy/README.md)") == []
    assert markdown_escapes("helm/sinkserve/README.md", "see [x](../../../outside/x.md)")
    assert markdown_escapes("README.md", "[site](https://example.com/../x) [a](#anchor)") == []
