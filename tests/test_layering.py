"""The layers only point down: common and protos at the bottom, serving and the client SDK beside each
other above them, the learner above both, the command line on top (nothing imports it). Inside serving,
each room imports only the rooms below it. Every import counts, function-level ones included, and so
does starting another layer's module as a child process (`-m cli...`)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("common", "protos", "serving", "clients", "learner", "cli", "benchmarks")

# package -> the packages it may import (itself always)
ALLOWED = {
    "common": set(),
    "protos": {"common"},
    "serving": {"common", "protos"},
    "clients": {"common", "protos"},
    "learner": {"common", "protos", "serving", "clients"},
    "cli": {"common", "protos", "serving", "clients", "learner"},
    "benchmarks": {"common", "protos", "serving", "clients", "learner"},
}
# serving's rooms (a top-level module is a room of its own) -> the rooms they may import
SERVING_ROOMS = {
    "batch": set(),
    "layers": {"batch"},
    "models": {"layers", "batch"},
    "engine": {"models", "layers", "batch"},
    "weights": {"engine"},
    "metrics": set(),
    "limits": set(),
    "placement": set(),
    "http": {"engine", "limits"},
    "rpc": {"engine", "weights", "metrics", "limits", "http", "placement"},
    "parallel": {"engine", "models", "layers", "batch", "weights", "rpc"},
    "launch": set(),
    "fleet": {"engine", "launch", "options"},
    "options": {"engine", "rpc", "parallel", "fleet", "limits"},
    "__main__": {"options"},
    "__init__": set(),
}
CHILD_MODULE = re.compile(r"""["']-m["'],\s*["']([\w.]+)["']""")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    found.update(m.group(1) for m in CHILD_MODULE.finditer(path.read_text()))
    return found


def room(parts: tuple[str, ...]) -> str:
    """serving.engine.loop -> engine; serving.options -> options."""
    return parts[1].removesuffix(".py") if len(parts) > 1 else "__init__"


def upward_arrows() -> list[str]:
    arrows = []
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            here = rel.parts
            for module in sorted(imported_modules(path)):
                parts = tuple(module.split("."))
                top = parts[0]
                if top not in OURS or top == package:
                    if top == "serving" == package and len(parts) > 1:
                        mine, theirs = room(here), parts[1]
                        if theirs in SERVING_ROOMS and theirs != mine and theirs not in SERVING_ROOMS[mine]:
                            arrows.append(f"{rel}: serving/{mine} -> serving/{theirs} ({module})")
                    continue
                if top not in ALLOWED[package]:
                    arrows.append(f"{rel}: {package} -> {top} ({module})")
    return arrows


def test_every_room_is_known():
    rooms = {p.name.removesuffix(".py") for p in (REPO / "serving").iterdir()
             if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert rooms <= set(SERVING_ROOMS), f"new serving room(s) {sorted(rooms - set(SERVING_ROOMS))}: place them in SERVING_ROOMS"


def test_serving_top_level_stays_small():
    modules = [p for p in (REPO / "serving").iterdir() if p.suffix == ".py"]
    assert len(modules) <= 12, sorted(p.name for p in modules)


def test_no_import_crosses_the_layers_upward():
    arrows = upward_arrows()
    assert not arrows, "upward imports:\n" + "\n".join(arrows)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a serving module that imports the CLI, or starts it as a child, is caught."""
    bad = tmp_path / "serving" / "engine" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from cli.main import main\n    return ['python', '-m', 'learner.jobs.up']\n")
    (tmp_path / "serving" / "layers").mkdir()
    (tmp_path / "serving" / "layers" / "k.py").write_text("from serving.rpc.server import serve\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for package in OURS:
        (tmp_path / package).mkdir(exist_ok=True)
    arrows = upward_arrows()
    assert any("serving -> cli" in a for a in arrows) and any("serving -> learner" in a for a in arrows)
    assert any("serving/layers -> serving/rpc" in a for a in arrows)
