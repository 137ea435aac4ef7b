"""The dependency locks: they satisfy pyproject.toml, agree, are what the tests run, and install by hash.

README "Deployment": the image installs requirements/image[-otlp].lock (pinned, hashed), `make install`
installs requirements/dev.lock (the same pins plus test and lint tools) as constraints, so the image holds
the versions these tests ran with.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
IMAGE, IMAGE_OTLP, DEV = LOCKS / "image.lock", LOCKS / "image-otlp.lock", LOCKS / "dev.lock"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def direct(lock: Path) -> set[str]:
    """The packages a lock says pyproject.toml asked for (uv's `# via edge-proxy (pyproject.toml)`)."""
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    return {
        canonicalize_name(Requirement(entry.split("\n", 1)[0].rstrip(" \\")).name)
        for entry in entries
        if entry and not entry.startswith("#") and "edge-proxy (pyproject.toml)" in entry
    }


def pins(lock: Path) -> dict[str, list[tuple[Requirement, int]]]:
    """Each package's pinned requirements (one per marker) and how many hashes each carries."""
    found: dict[str, list[tuple[Requirement, int]]] = {}
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.read_text())
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        head = entry.split("\\\n", 1)[0].split("\n", 1)[0].rstrip(" \\")
        requirement = Requirement(head)
        found.setdefault(canonicalize_name(requirement.name), []).append(
            (requirement, entry.count("--hash=sha256:"))
        )
    return found


def version(requirement: Requirement) -> str:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", requirement
    return specifier.version


# Each lock with the pyproject.toml extras it was made from.
EACH_LOCK = pytest.mark.parametrize(
    ("lock", "extras"),
    [(IMAGE, ()), (IMAGE_OTLP, ("otlp",)), (DEV, ("otlp", "test", "lint"))],
    ids=["image", "image-otlp", "dev"],
)


def declared(*extras: str) -> list[Requirement]:
    listed = PROJECT["dependencies"] + [d for e in extras for d in PROJECT["optional-dependencies"][e]]
    return [Requirement(d) for d in listed]


@EACH_LOCK
def test_each_lock_pins_every_declared_dependency_within_its_range(
    lock: Path, extras: tuple[str, ...]
) -> None:
    locked = pins(lock)
    for requirement in declared(*extras):
        entries = locked.get(canonicalize_name(requirement.name))
        assert entries, f"{requirement.name} is declared in pyproject.toml but not in {lock.name}: make lock"
        for pinned, _ in entries:
            assert requirement.specifier.contains(version(pinned), prereleases=True), (
                f"{lock.name} pins {pinned}, outside pyproject.toml's {requirement}: make lock"
            )
        for extra in requirement.extras:  # redis[hiredis]: the extra's packages are locked too
            assert extra == "hiredis", requirement
            assert "hiredis" in locked, requirement


@EACH_LOCK
def test_each_lock_was_made_from_the_dependencies_pyproject_declares_now(
    lock: Path, extras: tuple[str, ...]
) -> None:
    """A dependency added to or removed from pyproject.toml without `make lock` shows here."""
    assert direct(lock) == {canonicalize_name(r.name) for r in declared(*extras)}, f"{lock.name}: make lock"


@pytest.mark.parametrize("lock", [IMAGE, IMAGE_OTLP], ids=["image", "image-otlp"])
def test_every_package_of_the_image_is_pinned_with_hashes(lock: Path) -> None:
    for entries in pins(lock).values():
        for pinned, hashes in entries:
            assert hashes >= 1, f"{pinned} has no hash in {lock.name}"


def test_the_locks_agree_the_image_without_otlp_being_part_of_it_and_dev_holding_it_whole() -> None:
    def versions(lock: Path) -> set[tuple[str, str, str]]:
        return {(n, version(r), str(r.marker)) for n, entries in pins(lock).items() for r, _ in entries}

    assert versions(IMAGE) <= versions(IMAGE_OTLP)
    assert versions(IMAGE_OTLP) <= versions(DEV)
    assert {"opentelemetry-exporter-otlp-proto-http", "protobuf"} <= set(pins(IMAGE_OTLP)) - set(pins(IMAGE))


# `make test-floors`: the suite in a virtualenv of pyproject.toml's lowest versions instead of the lock's.
FLOORS_RUN = os.environ.get("EDGE_PROXY_TEST_FLOORS") == "1"


@pytest.mark.skipif(FLOORS_RUN, reason="the floors run installs pyproject.toml's floors, not the lock's")
def test_the_tests_run_with_the_pinned_versions() -> None:
    """`make install` installed dev.lock's pins: what passes here is what the image ships."""
    differ = []
    for name, entries in pins(DEV).items():
        for pinned, _ in entries:
            if pinned.marker is not None and not pinned.marker.evaluate():
                continue
            try:
                installed = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                installed = "not installed"
            if installed != version(pinned):
                differ.append(f"{name}: {installed}, locked {version(pinned)}")
    assert not differ, f"the test environment is not the lock's (run make install): {differ}"


@pytest.mark.skipif(not FLOORS_RUN, reason="only in the floors run (make test-floors)")
def test_the_floors_run_has_every_runtime_dependency_at_its_floor() -> None:
    """What passes in the floors run holds at every `>=` of pyproject.toml: a floor no resolver can reach
    (one that another dependency's own floor lifts) is a promise nobody tested, and fails here."""
    off = []
    for line in PROJECT["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        installed = importlib.metadata.version(requirement.name)
        if Version(installed) != Version(floor):
            off.append(f"{requirement.name}: {installed}, floor {floor}")
    assert not off, f"not at their floors: {off}"


def _dockerfile_build_steps(venv_dir: Path) -> str:
    """The Dockerfile's RUNs that make the virtualenv and install a lock, as one shell script.

    With `venv_dir` for /opt/edge-proxy, and this interpreter (which has pip) for the base image's python3.
    """
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    steps = [
        line[len("RUN ") :]
        for line in text.splitlines()
        if line.startswith(("RUN python3 -m venv ", "RUN lock="))
    ]
    assert len(steps) == 2, steps
    script = " && ".join(f"{{ {step}; }}" for step in steps)
    return script.replace("/opt/edge-proxy", str(venv_dir)).replace("python3 ", f"{sys.executable} ")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dockerfile_installs_the_image_lock_by_hash_and_it_is_complete(tmp_path: Path) -> None:
    """The Dockerfile's own steps, run against a fresh virtualenv in place of /opt/edge-proxy.

    Downloads from the package index (pip's cache helps the second time). pip check passing means the lock
    holds every dependency of every package in it: the image installs it with --no-deps.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_PROXY", "VIRTUAL_ENV"))}
    for extras, lock in (("otlp", IMAGE_OTLP), ("", IMAGE)):
        target = tmp_path / f"venv-{extras or 'plain'}"
        done = subprocess.run(
            ["sh", "-c", _dockerfile_build_steps(target)],
            cwd=ROOT,
            env={**environment, "EXTRAS": extras},
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "No broken requirements found." in done.stdout
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "--python", target / "bin" / "python", "list", "--format=freeze"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        installed = {canonicalize_name(line.partition("==")[0]) for line in listed.split()}
        assert set(pins(lock)) - {"async-timeout"} <= installed  # async-timeout: only before 3.11.3
        assert ("protobuf" in installed) == (extras == "otlp")
        assert not {"pip", "setuptools"} & installed  # nothing that floats with the base image
    refused = subprocess.run(
        ["sh", "-c", _dockerfile_build_steps(tmp_path / "none")],
        cwd=ROOT,
        env={**environment, "EXTRAS": "otlp,prometheus"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "EXTRAS must be otlp or empty, not 'otlp,prometheus'" in refused.stderr


INSTALLERS = ("pip", "setuptools", "wheel")


def _runtime_uninstall_step() -> str:
    """The runtime stage's removal of the base image's installers, as a shell command."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runtime = text[text.index(" AS runtime") :]
    found = re.search(r"if python3 -m pip [^\n]*?; fi", runtime)
    assert found is not None, "the runtime stage leaves the base image's pip, setuptools and wheel"
    return found.group(0)


def _installers(python: Path) -> list[str]:
    code = f"import importlib.util as u; print(*[m for m in {INSTALLERS} if u.find_spec(m)])"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.slow
def test_the_runtime_stage_removes_the_base_images_installers(tmp_path: Path) -> None:
    """pip, setuptools and wheel in the base image are build tools the running proxy never uses (a scanner's
    CVEs, found by a reviewer); a base without pip has nothing to remove and still builds."""
    step = _runtime_uninstall_step()
    for name, seed in (("base", True), ("distribution", False)):
        base = tmp_path / name
        venv.create(base, with_pip=seed)
        python = base / "bin" / "python3"
        assert ("pip" in _installers(python)) == seed
        done = subprocess.run(
            ["sh", "-c", step.replace("python3 ", f"{python} ")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert _installers(python) == [], name


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's `patterns` leave `path` out of the build context (the last match decides;
    a pattern matching a parent directory matches everything below it)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        matcher = regex(pattern.lstrip("!").strip("/"))
        if any(matcher.match(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    """.dockerignore is an allow-list: a COPY source left off it fails `docker build` (no engine here)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert "requirements/image.lock" in sources
    for source in sources:
        files = [f for f in tracked if f == source or f.startswith(source.rstrip("/") + "/")]
        assert files, f"COPY {source}: no such file in the repository"
        for file in files:
            assert not _dockerignore_excludes(file, patterns), f"COPY {source}: {file} is not in the context"
    assert _dockerignore_excludes("tests/test_locks.py", patterns)  # the allow-list still leaves others out
    assert _dockerignore_excludes("proxy/__pycache__/app.cpython-311.pyc", patterns)
