"""Hold the device runner to the torch 1.10 API, statically (the Jetson Nano stops at 1.10).

``torch110_api.json`` is torch 1.10.1's own API, dumped by ``torch_api_dump.py`` in the Python
3.6 + torch 1.10.1 stack: its public names, the members of the classes a runner touches
(tensors, modules, optimizers, autograd contexts) and the parameter names of its Python-level
functions. ``violations`` reads a source file with ``ast`` and reports

* a dotted torch name (``torch.x``, ``F.x``, ``nn.x`` through the file's imports) that 1.10 lacks;
* a keyword argument that a 1.10 function does not take (``torch.load(weights_only=...)``);
* an attribute used on any object that today's torch has on a tensor, module or optimizer but
  1.10 did not (``t.untyped_storage()``), since a tensor's type is not known statically.

It cannot see behaviour that changed behind an old name (a dtype view that 1.10 refuses): the
runner's tests on the real 1.10 stack catch those.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import torch

ALLOW_LIST = Path(__file__).resolve().parent / "torch110_api.json"


def load_allow_list(path: Path = ALLOW_LIST) -> dict:
    data = json.loads(Path(path).read_text())
    return {"torch": data["torch"], "names": set(data["names"]), "members": set(data["members"]),
            "signatures": data["signatures"]}


def current_members() -> set:
    """Members of the same classes in the torch running now."""
    classes = (torch.Tensor, torch.nn.Module, torch.nn.Parameter, torch.optim.Optimizer, torch.optim.Adam,
               torch.optim.lr_scheduler.CosineAnnealingLR, torch.Generator, torch.autograd.Function,
               torch.autograd.function.BackwardCFunction)
    return {attr for cls in classes for attr in dir(cls)}


def _aliases(tree: ast.Module) -> dict:
    """Local name -> dotted torch name, from the file's imports."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    if alias.asname:
                        aliases[alias.asname] = alias.name
                    else:
                        aliases["torch"] = "torch"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id], *reversed(parts)])
    return None


def violations(source: str, allowed: dict | None = None) -> list[str]:
    """Every use of torch API newer than the allow-list in ``source``, as 'line N: message'."""
    allowed = allowed or load_allow_list()
    tree = ast.parse(source)
    aliases = _aliases(tree)
    newer_members = current_members() - allowed["members"]
    found = []

    def report(node, message):
        found.append(f"line {node.lineno}: {message}")

    for name, dotted in aliases.items():
        if dotted not in allowed["names"]:
            found.append(f"import: {dotted} does not exist in torch {allowed['torch']}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node, aliases)
            if dotted is not None:
                if dotted not in allowed["names"] and _dotted(node.value, aliases) in allowed["names"]:
                    report(node, f"{dotted} does not exist in torch {allowed['torch']}")
            elif node.attr in newer_members:
                report(node, f".{node.attr} is newer than torch {allowed['torch']}")
        elif isinstance(node, ast.Call):
            dotted = _dotted(node.func, aliases)
            params = allowed["signatures"].get(dotted) if dotted else None
            if params is not None:
                for keyword in node.keywords:
                    if keyword.arg is not None and keyword.arg not in params:
                        report(node, f"{dotted}() takes no keyword {keyword.arg!r} in torch {allowed['torch']}")
    return found


def check_file(path) -> list[str]:
    return violations(Path(path).read_text())
