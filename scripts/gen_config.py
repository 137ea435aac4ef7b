"""Write config/edge-proxy.yaml from proxy/settings.py: every key, its default, and the comment above it.

The settings module is the one source of truth; tests/test_config_file.py fails when the file is stale.
Run: .venv/bin/python scripts/gen_config.py
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from proxy import settings as settings_module
from proxy.config_loader import ENV_ALIASES
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "config" / "edge-proxy.yaml"

HEADER = """\
# edge-proxy configuration: every key with its default (units are in the key names). Generated from
# proxy/settings.py by scripts/gen_config.py; edit the settings module, then regenerate.
#
# Environment variables override this file: {aliases}
# and any key as EDGE_PROXY__<SECTION>__<KEY> (e.g. EDGE_PROXY__UPSTREAM__READ_TIMEOUT_SECONDS=10).
# An unknown key, a bad URL, mode or rate string refuses to start and names every offending key.
"""


def field_comments() -> dict[tuple[str, str], list[str]]:
    """(class name, field name) -> the comment lines written just above that field."""
    source = inspect.getsource(settings_module)
    lines = source.splitlines()
    found: dict[tuple[str, str], list[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                comment: list[str] = []
                row = item.lineno - 2
                while row >= 0 and lines[row].strip().startswith("#"):
                    comment.insert(0, lines[row].strip().lstrip("#").strip())
                    row -= 1
                found[(node.name, item.target.id)] = comment
    return found


def scalar(value: Any) -> str:
    """A YAML flow value for a default."""
    if isinstance(value, SecretStr):
        return "null"
    if isinstance(value, tuple):
        value = list(value)
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        value = value.value
    return json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value)


def render(model: BaseModel, comments: dict[tuple[str, str], list[str]], indent: int = 0) -> list[str]:
    """The YAML lines of one section, nested sections included."""
    out: list[str] = []
    pad = "  " * indent
    for name in type(model).model_fields:
        value = getattr(model, name)
        for line in comments.get((type(model).__name__, name), []):
            out.append(f"{pad}# {line}".rstrip())
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip()
            if doc:
                out.append(f"{pad}# {doc}")
            out.append(f"{pad}{name}:")
            out.extend(render(value, comments, indent + 1))
        else:
            out.append(f"{pad}{name}: {scalar(value)}")
    return out


def generate() -> str:
    """The whole file's text."""
    aliases = textwrap.fill(", ".join(ENV_ALIASES) + ",", width=100, subsequent_indent="# ")
    body = render(Settings(), field_comments())
    return HEADER.format(aliases=aliases) + "\n" + "\n".join(body) + "\n"


if __name__ == "__main__":
    text = generate()
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.read_text() == text else 1)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
