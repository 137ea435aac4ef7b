"""The `edge-proxy` command: check-config and serve refuse a bad configuration, naming every bad key."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config_loader import ENV_ALIASES
from tests.rig import free_port

ROOT = Path(__file__).resolve().parent.parent

BAD_FILE = """
service_mode: everything
upstream: {url: "not a url"}
rate_limits: {default: lots}
upstream_typo: 1
"""
BAD_KEYS = ("upstream.url", "service_mode", "rate_limits.default", "upstream_typo")


def clean_environ() -> dict[str, str]:
    """This process's environment without any edge-proxy configuration."""
    return {k: v for k, v in os.environ.items() if k not in ENV_ALIASES and not k.startswith("EDGE_PROXY")}


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests set the configuration they mean; none leaks in from the shell."""
    for name in set(os.environ) - set(clean_environ()):
        monkeypatch.delenv(name)


def run(
    *args: str,
    env: dict[str, str] | None = None,
    command: str | None = None,
    open_files: tuple[int, int] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the installed command (or `python -m proxy`) with only `env` as configuration.

    `open_files`: the (soft, hard) RLIMIT_NOFILE it starts with. PYTHONPATH: either one imports `proxy` from
    this checkout, not wherever the venv's editable install points.
    """
    argv = [command] if command else [sys.executable, "-m", "proxy"]

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, open_files)

    return subprocess.run(
        [*argv, *args],
        env={**clean_environ(), "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_open_files if open_files is not None else None,
    )


def test_check_config_accepts_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.yaml"
    path.write_text("service_mode: definitions\nupstream: {url: 'http://backend:8000'}\nworkers: 2\n")
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out
    assert "mode definitions" in out
    assert "upstream http://backend:8000" in out
    assert "workers 2" in out


def test_check_config_names_every_bad_key_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_FILE)
    assert main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edge-proxy: invalid configuration (4 problems):")
    for key in BAD_KEYS:
        assert f"\n  {key}: " in err, key


def test_check_config_names_every_bad_environment_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {
        "UPSTREAM_URL": "not a url",
        "SERVICE_MODE": "everything",
        "EDGE_PROXY__RATE_LIMITS__DEFAULT": "lots",
        "EDGE_PROXY__UPSTREAM_TYPO": "1",
        "BIND": "8080",
    }.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config"]) == 2
    err = capsys.readouterr().err
    assert "(5 problems)" in err
    assert "upstream.url (from $UPSTREAM_URL)" in err
    assert "service_mode (from $SERVICE_MODE)" in err
    assert "rate_limits.default (from $EDGE_PROXY__RATE_LIMITS__DEFAULT)" in err
    assert "upstream_typo (from $EDGE_PROXY__UPSTREAM_TYPO): unknown key" in err
    assert "bind (from $BIND)" in err


@pytest.mark.parametrize(("text", "expected"), [(None, "No such file"), ("a: [b\n", "not valid YAML")])
def test_unreadable_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["check-config", "--config", str(path)]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("workers", "expected"), [("0", "greater than or equal to 1"), ("65", "less than")])
def test_workers_flag_is_validated(capsys: pytest.CaptureFixture[str], workers: str, expected: str) -> None:
    assert main(["serve", "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert "workers (from --workers)" in err
    assert expected in err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["console-script", "python -m"])
def test_entry_points(tmp_path: Path, how: str) -> None:
    command = str(Path(sys.executable).with_name("edge-proxy")) if how == "console-script" else None
    good = run("check-config", env={"SERVICE_MODE": "FLAGS"}, command=command)
    assert good.returncode == 0, good.stderr
    assert "mode flags" in good.stdout
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_FILE)
    bad = run("check-config", "--config", str(path), command=command)
    assert bad.returncode == 2
    for key in BAD_KEYS:
        assert key in bad.stderr


@pytest.mark.slow
def test_serve_refuses_a_bad_configuration_before_listening(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_FILE)
    result = run("serve", "--config", str(path), env={"BIND": f"127.0.0.1:{port}"})
    assert result.returncode == 2
    for key in BAD_KEYS:
        assert key in result.stderr
    assert "listening" not in result.stderr


@pytest.mark.slow
def test_serve_exits_1_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        # Bound without SO_REUSEPORT, so the proxy's reuse_port bind on the same port fails.
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", env={"BIND": f"127.0.0.1:{port}", "LOG_FORMAT": "text"})
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.slow
def test_serve_refuses_a_connection_cap_the_open_file_limit_cannot_hold() -> None:
    # 1,000 clients + 256 upstream + 2 x 16 Redis + 64 spare = 1,352 descriptors; the hard limit is 1,024.
    env = {"BIND": f"127.0.0.1:{free_port()}", "EDGE_PROXY__CLIENT_LIMITS__MAX_CONNECTIONS": "1000"}
    for command in ("serve", "check-config"):  # check-config sees what serve would
        result = run(command, env=env, open_files=(512, 1024))
        assert result.returncode == 2, command
        assert "client_limits.max_connections: 1000 client connections" in result.stderr
        assert "need 1352 open files; this process may open 1024" in result.stderr  # soft limit raised first
        assert "listening" not in result.stderr
    env["EDGE_PROXY__CLIENT_LIMITS__MAX_CONNECTIONS"] = "672"
    accepted = run("check-config", env=env, open_files=(512, 1024))
    assert accepted.returncode == 0, accepted.stderr
    assert "up to 672 client connections" in accepted.stdout
