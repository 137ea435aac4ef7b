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
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = ROOT / "requirements"
IMAGE, IMAGE_OTLP, DEV = LOCKS / "image.lock", LOCKS / "image-otlp.lock", LOCKS / "dev.lock"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


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


def declared(*extras: str) -> list[Requirement]:
    listed = PROJECT["dependencies"] + [d for e in extras for d in PROJECT["optional-dependencies"][e]]
    return [Requirement(d) for d in listed]


@pytest.mark.parametrize(
    ("lock", "extras"),
    [(IMAGE, ()), (IMAGE_OTLP, ("otlp",)), (DEV, ("otlp", "test", "lint"))],
    ids=["image", "image-otlp", "dev"],
)
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


def _dockerfile_install_step() -> str:
    """The Dockerfile's RUN that installs a lock, as the shell script it runs."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    (step,) = [line[len("RUN ") :] for line in text.splitlines() if line.startswith("RUN lock=")]
    return step


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dockerfile_installs_the_image_lock_by_hash_and_it_is_complete(tmp_path: Path) -> None:
    """The Dockerfile's own step, run against a fresh virtualenv in place of /opt/edge-proxy.

    Downloads from the package index (pip's cache helps the second time). pip check passing means the lock
    holds every dependency of every package in it: the image installs it with --no-deps.
    """
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_PROXY", "VIRTUAL_ENV"))}
    for extras, lock in (("otlp", IMAGE_OTLP), ("", IMAGE)):
        target = tmp_path / f"venv-{extras or 'plain'}"
        venv.create(target, with_pip=True)
        script = _dockerfile_install_step().replace("/opt/edge-proxy", str(target))
        done = subprocess.run(
            ["sh", "-c", script],
            cwd=ROOT,
            env={**environment, "EXTRAS": extras},
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "No broken requirements found." in done.stdout
        listed = subprocess.run(
            [target / "bin" / "python", "-m", "pip", "list", "--format=freeze"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        installed = {canonicalize_name(line.partition("==")[0]) for line in listed.split()}
        assert set(pins(lock)) - {"async-timeout"} <= installed  # async-timeout: only before 3.11.3
        assert ("protobuf" in installed) == (extras == "otlp")
    refused = subprocess.run(
        ["sh", "-c", _dockerfile_install_step().replace("/opt/edge-proxy", str(tmp_path / "none"))],
        cwd=ROOT,
        env={**environment, "EXTRAS": "otlp,prometheus"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert "EXTRAS must be otlp or empty, not 'otlp,prometheus'" in refused.stderr
