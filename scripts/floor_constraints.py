"""Constraints for `make test-floors`: requirements/dev.lock's test and lint tools, without the packages a
lowest-direct resolution of the runtime dependencies pinned (those stay at their floors).

Usage: python scripts/floor_constraints.py FLOORS_TXT > tools.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def pinned(line: str) -> str | None:
    """The package a lock line pins (normalized), or None for a comment or continuation."""
    if not line or line[0] in " #-":
        return None
    return canonicalize_name(Requirement(line.split(";")[0].strip()).name)


def main(floors: Path) -> None:
    at_floor = {name for line in floors.read_text().splitlines() if (name := pinned(line))}
    for line in (ROOT / "requirements" / "dev.lock").read_text().splitlines():
        if pinned(line) not in at_floor:
            print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
