"""Check README.md and docs/*.md against the code, so that the documentation cannot drift unnoticed:

- every relative link and image path exists, and every `#anchor` names a heading of its page;
- every `clusterar ...` command of a bash block parses with the real parser (`torchrun ... -m clusterar`
  and shell variables set in the block included) and uses only flags that exist, exactly spelled;
  commands quoted inline in the text use only flags that exist;
- every `python SCRIPT.py` of a bash block exists;
- every Python block parses, and every name it imports exists;
- every row of architecture.md's "where each concept lives" table names a file that exists and functions or
  classes (`Class.attribute` included) defined in it.

    python docs/check_docs.py        # prints the problems; exit status 1 if there are any
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusterar.cli import build_parser  # noqa: E402

CODE = re.compile(r"```.*?```", re.S)


def anchors(md: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+ (.*)$", CODE.sub("", md.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def check_links(page: Path) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", CODE.sub("", page.read_text())):
        if re.match(r"https?://", target):
            continue
        path, _, frag = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: link to missing {target}")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            problems.append(f"{page.name}: link to missing anchor {target}")
    return problems


def subparser(argv: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the (sub)command `argv` names, and those names."""
    p = build_parser(next((a for a in argv if not a.startswith("-")), None))
    names: list[str] = []
    while True:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        pos = [a for a in argv if not a.startswith("-")]
        nxt = next((a for a in pos if subs and a in subs[0].choices and a not in names), None)
        if nxt is None:
            return p, names
        names.append(nxt)
        p = subs[0].choices[nxt]


def unknown_flags(argv: list[str], where: str) -> list[str]:
    """Flags that the command does not have, spelled exactly (argparse would accept abbreviations)."""
    p, names = subparser(argv)
    flags = {o for a in p._actions for o in a.option_strings}
    return [
        f"{where}: `clusterar {' '.join(names)}` has no flag {t.split('=')[0]}"
        for t in argv
        if t.startswith("--") and t.split("=")[0] not in flags
    ]


def shell_commands(block: str):
    """The commands of a bash block: continuation lines joined, comments dropped, VAR="..." expanded."""
    env: dict[str, str] = {}
    for line in re.sub(r"\\\n\s*", " ", block).split("\n"):
        line = "" if line.strip().startswith("#") else line.split(" #")[0].strip()
        if m := re.match(r'^(\w+)="(.*)"$', line):
            env[m.group(1)] = m.group(2)
        elif line:
            for k, v in env.items():
                line = line.replace("$" + k, v)
            yield from re.split(r"\s*&&\s*", line)


def check_command(command: str, where: str) -> list[str]:
    toks = shlex.split(command)
    if toks[:1] == ["torchrun"]:
        toks = toks[toks.index("-m") + 1 :]
    if toks[:1] in (["python"], ["python3"]) and toks[1:2] and toks[1].endswith(".py"):
        return [] if (ROOT / toks[1]).exists() else [f"{where}: script {toks[1]} missing"]
    if toks[:1] != ["clusterar"]:
        return []
    argv = toks[1:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser(next((a for a in argv if not a.startswith("-")), None)).parse_args(argv)
        except SystemExit as e:
            if e.code:
                return [f"{where}: `{command}` does not parse: {err.getvalue().strip()[-300:]}"]
    return unknown_flags(argv, where)


def check_commands(page: Path) -> tuple[list[str], int]:
    text, problems, n = page.read_text(), [], 0
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("bash", ""):
            for command in shell_commands(block):
                n += command.startswith(("clusterar", "torchrun"))
                problems += check_command(command, page.name)
    for cmd in re.findall(r"`(clusterar [^`]+)`", CODE.sub("", text)):
        toks = [t for t in cmd.replace("...", " ").split()[1:] if not t.startswith("$")]
        problems += unknown_flags(toks, f"{page.name} (inline `{cmd}`)")
    return problems, n


def check_python(page: Path) -> list[str]:
    problems = []
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.S):
        try:
            tree = ast.parse(block)
        except SyntaxError as e:
            problems.append(f"{page.name}: a Python block does not parse: {e}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                problems += [
                    f"{page.name}: {node.module} has no {a.name}"
                    for a in node.names
                    if not hasattr(module, a.name)
                ]
    return problems


def defined_names(path: Path) -> set[str]:
    """Module-level functions, classes and assignments of a Python file, and `Class.member` for members."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef | ast.ClassDef):
                    names.add(f"{node.name}.{member.name}")
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def check_architecture(page: Path) -> list[str]:
    """The concept table: `| concept | `FILE` | `name`, `Class.member (...)` |` rows, each checked."""
    problems = []
    for concept, file, where in re.findall(
        r"^\| ([^|]+) \| `([\w/.]+\.py)` \| ([^|]+) \|$", page.read_text(), re.M
    ):
        path = ROOT / file
        if not path.is_file():
            problems.append(f"{page.name}: {concept.strip()}: {file} does not exist")
            continue
        have = defined_names(path)
        for name in re.findall(r"`([\w.]+)", where):
            if name not in have:
                problems.append(f"{page.name}: {concept.strip()}: {file} defines no {name}")
    return problems


def main() -> int:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems, commands = [], 0
    for page in pages:
        found, n = check_commands(page)
        problems += check_links(page) + found + check_python(page)
        if page.name == "architecture.md":
            problems += check_architecture(page)
        commands += n
    print(f"{len(pages)} pages, {commands} commands checked")
    print("\n".join(problems) or "no problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
