"""load_settings: file, then environment; every problem reported at once with the key that caused it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from proxy.config_loader import load_settings
from proxy.settings import (
    BillingSettings,
    ConfigError,
    DefinitionsSettings,
    LoggingSettings,
    QuotaSettings,
    RateLimitSettings,
    RedisLayout,
    RedisSettings,
    ServiceMode,
    Settings,
    UpstreamSettings,
)


def write(tmp_path: Path, text: str) -> Path:
    """A config file holding `text`."""
    path = tmp_path / "edge-proxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(path: Path | None = None, env: dict[str, str] | None = None) -> str:
    """The ConfigError message for this file and environment."""
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env or {})
    return str(caught.value)


def test_defaults_of_every_section() -> None:
    settings = load_settings(None, {})
    assert settings == Settings()
    assert (settings.bind_host, settings.bind_port) == ("0.0.0.0", 8080)
    assert settings.service_mode is ServiceMode.ALL
    assert settings.workers == 1
    # Below Kubernetes' default 30 s grace period.
    assert settings.shutdown_timeout_seconds == 20.0
    assert settings.upstream == UpstreamSettings()
    assert settings.upstream.base == "http://127.0.0.1:8000"
    assert settings.upstream.host_header == "client"
    assert settings.upstream.trusted_proxies == ()
    assert settings.redis == RedisSettings()
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.redis.timeout_seconds == 0.5
    assert settings.layout == RedisLayout()
    assert settings.layout.key_prefix == "posthog"
    assert settings.layout.team_key == "team_token:{token}"
    assert settings.definitions == DefinitionsSettings()
    assert settings.definitions.path == "/flags/definitions"
    assert "/api/feature_flag/local_evaluation" in settings.definitions.aliases
    assert settings.quota == QuotaSettings()
    assert settings.quota.poll_interval_seconds == 2.0
    assert settings.billing == BillingSettings()
    assert settings.billing.flush_interval_seconds == 30.0
    assert settings.rate_limits == RateLimitSettings()
    assert (settings.rate_limits.enabled, settings.rate_limits.default) == (True, "600/minute")
    assert settings.logging == LoggingSettings()
    assert (settings.logging.level, settings.logging.format) == ("INFO", "json")


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "# nothing set\n"), {}) == Settings()


def test_file_values_are_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
bind: "127.0.0.1:9000"
service_mode: definitions
workers: 3
upstream: {url: "http://backend:8000/prefix/", read_timeout_seconds: 5}
rate_limits:
  default: 10/second
  team_overrides: {"42": 100 per minute}
  allowlist: [phc_a, phc_b]
logging: {level: debug, format: text}
""",
    )
    settings = load_settings(path, {})
    assert (settings.bind_host, settings.bind_port) == ("127.0.0.1", 9000)
    assert settings.service_mode is ServiceMode.DEFINITIONS
    assert settings.workers == 3
    assert settings.upstream.base == "http://backend:8000/prefix"
    assert settings.upstream.read_timeout_seconds == 5.0
    assert settings.rate_limits.default == "10/second"
    assert settings.rate_limits.team_overrides == {"42": "100 per minute"}
    assert settings.rate_limits.allowlist == ("phc_a", "phc_b")
    assert (settings.logging.level, settings.logging.format) == ("DEBUG", "text")


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
bind: "127.0.0.1:9000"
service_mode: flags
upstream: {url: "http://from-file:1", connect_timeout_seconds: 3}
redis: {url: "redis://from-file:6379/0"}
logging: {level: ERROR}
shutdown_timeout_seconds: 10
""",
    )
    env = {
        "UPSTREAM_URL": "http://from-env:2",
        "REDIS_URL": "redis://from-env:6380/1",
        "SERVICE_MODE": "definitions",
        "BIND": "127.0.0.2:9001",
        "WORKERS": "4",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "text",
        "SHUTDOWN_TIMEOUT_SECONDS": "12.5",
        "EDGE_PROXY__UPSTREAM__CONNECT_TIMEOUT_SECONDS": "7",
    }
    settings = load_settings(path, env)
    assert settings.upstream.base == "http://from-env:2"
    assert settings.redis.url == "redis://from-env:6380/1"
    assert settings.service_mode is ServiceMode.DEFINITIONS
    assert settings.bind == "127.0.0.2:9001"
    assert settings.workers == 4
    assert (settings.logging.level, settings.logging.format) == ("WARNING", "text")
    assert settings.shutdown_timeout_seconds == 12.5
    assert settings.upstream.connect_timeout_seconds == 7.0


def test_environment_alone_without_a_file() -> None:
    settings = load_settings(None, {"UPSTREAM_URL": "https://backend.internal"})
    assert settings.upstream.base == "https://backend.internal"


@pytest.mark.parametrize(
    ("raw", "mode"), [("FLAGS", "flags"), ("Definitions", "definitions"), ("all", "all")]
)
def test_service_mode_is_case_insensitive(raw: str, mode: str) -> None:
    assert load_settings(None, {"SERVICE_MODE": raw}).service_mode.value == mode


@pytest.mark.parametrize(
    ("bind", "host", "port"),
    [
        ("0.0.0.0:8080", "0.0.0.0", 8080),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("localhost:65535", "localhost", 65535),
        ("edge-proxy.flags.svc.cluster.local:80", "edge-proxy.flags.svc.cluster.local", 80),
        ("[::1]:8080", "::1", 8080),
        ("[::]:9000", "::", 9000),
    ],
)
def test_bind_parsing(bind: str, host: str, port: int) -> None:
    settings = load_settings(None, {"BIND": bind})
    assert (settings.bind_host, settings.bind_port) == (host, port)


@pytest.mark.parametrize(
    "bind",
    [
        "8080",
        "localhost",
        ":8080",
        "host:",
        "host:0",
        "host:65536",
        "host:http",
        "::1",
        "a:b:80",
        "[nope]:80",
        "[::1]",
        "host:\uff18\uff10",
        # check-config took these and serve could not listen (a reviewer's): a space, a control character
        " 127.0.0.1:8080",
        "no such host:8080",
        "host\t:8080",
        "-host:8080",
    ],
)
def test_bad_bind_is_refused(bind: str) -> None:
    assert "bind (from $BIND): " in problems(env={"BIND": bind})


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "String should have at least 1 character"),
        (" gunicorn", "Value error, a header value: printable ASCII, no leading or trailing space"),
        (
            "gunicorn\r\nSet-Cookie: a=b",
            "Value error, a header value: printable ASCII, no leading or trailing space",
        ),
        ("caf\u00e9", "Value error, a header value: printable ASCII, no leading or trailing space"),
        ("x" * 257, "String should have at most 256 characters"),
    ],
    ids=["empty", "leading space", "header injection", "not ascii", "too long"],
)
def test_a_server_header_that_is_no_header_value_is_refused(value: str, problem: str) -> None:
    assert problems(env={"EDGE_PROXY__SERVER_HEADER": value}) == (
        f"invalid configuration (1 problem):\n  server_header (from $EDGE_PROXY__SERVER_HEADER): {problem}"
    )


def test_the_server_header_is_the_reference_backends_unless_set() -> None:
    assert load_settings(None, {}).server_header == "gunicorn"
    assert (
        load_settings(None, {"EDGE_PROXY__SERVER_HEADER": "Apache/2 (Unix)"}).server_header
        == "Apache/2 (Unix)"
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"WORKERS": "4", "BIND": "0.0.0.0:9001", "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "9000"},
            "telemetry.worker_metrics_port: ports 9000-9003 for 4 workers would take bind's port 9001",
        ),
        (
            {"WORKERS": "3", "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "65534"},
            "telemetry.worker_metrics_port: ports 65534-65536 for 3 workers go past 65535",
        ),
        (
            {
                "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "9100",
                "EDGE_PROXY__TELEMETRY__METRICS_ENABLED": "false",
            },
            "telemetry.worker_metrics_port: needs telemetry.metrics_enabled",
        ),
    ],
    ids=["includes bind's port", "past 65535", "metrics off"],
)
def test_unusable_worker_metrics_ports_are_refused_naming_the_key(env: dict[str, str], problem: str) -> None:
    assert problems(env=env) == f"invalid configuration (1 problem):\n  {problem}"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"BIND": "0.0.0.0:9000", "EDGE_PROXY__HEALTH_PORT": "9000"}, "health_port: 9000 is bind's port"),
        (
            {
                "WORKERS": "2",
                "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "9100",
                "EDGE_PROXY__HEALTH_PORT": "9101",
            },
            "health_port: 9101 is one of telemetry.worker_metrics_port's",
        ),
        (
            {"EDGE_PROXY__HEALTH_PORT": "0"},
            "health_port (from $EDGE_PROXY__HEALTH_PORT): Input should be greater than or equal to 1",
        ),
        ({"EDGE_PROXY__HEALTH_PORT_ONLY": "true"}, "health_port_only: needs health_port"),
    ],
    ids=["bind's port", "a worker's metrics port", "zero", "only, without one"],
)
def test_an_unusable_health_port_is_refused_naming_the_key(env: dict[str, str], problem: str) -> None:
    assert problems(env=env) == f"invalid configuration (1 problem):\n  {problem}"


def test_a_health_port_beside_bind_and_the_worker_metrics_ports_is_accepted() -> None:
    env = {
        "WORKERS": "2",
        "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "9100",
        "EDGE_PROXY__HEALTH_PORT": "9102",
    }
    assert load_settings(None, env).health_port == 9102
    assert load_settings(None, {}).health_port is None


def test_worker_metrics_ports_next_to_bind_are_accepted() -> None:
    settings = load_settings(
        None, {"WORKERS": "4", "BIND": "0.0.0.0:9000", "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "9001"}
    )
    assert settings.telemetry.worker_metrics_port == 9001


def test_generic_nested_environment_values_are_typed_by_the_field() -> None:
    settings = load_settings(
        None,
        {
            "EDGE_PROXY__REDIS__TIMEOUT_SECONDS": "1.5",
            "EDGE_PROXY__RATE_LIMITS__ENABLED": "false",
            "EDGE_PROXY__DEFINITIONS__ALIASES": "[/a, /b/]",
            "EDGE_PROXY__RATE_LIMITS__TEAM_OVERRIDES": '{"42": 10/second, 7: 1/minute}',
            # Flow collections of numbers stay strings where the field holds strings.
            "EDGE_PROXY__RATE_LIMITS__ALLOWLIST": "[1, 2]",
            # YAML 1.1 would make these True and 16; a string field keeps them as written.
            "EDGE_PROXY__LAYOUT__KEY_PREFIX": "on",
            "EDGE_PROXY__LAYOUT__MISSING_MARKER": "0x10",
            "EDGE_PROXY__UPSTREAM__TRUSTED_PROXIES": "[10.0.0.0/8, '::1']",
        },
    )
    assert settings.redis.timeout_seconds == 1.5
    assert settings.rate_limits.enabled is False
    assert settings.definitions.aliases == ("/a", "/b/")
    assert settings.rate_limits.team_overrides == {"42": "10/second", "7": "1/minute"}
    assert settings.rate_limits.allowlist == ("1", "2")
    assert settings.layout.key_prefix == "on"
    assert settings.layout.missing_marker == "0x10"
    assert settings.upstream.trusted_proxies == ("10.0.0.0/8", "::1")


def test_a_string_from_the_environment_that_begins_with_a_bracket_stays_a_string() -> None:
    """Read as YAML, each was refused as "no valid string", and the environment is the only way a secret gets
    in (the chart keeps them out of the config file). Found by a reviewer."""
    settings = load_settings(
        None,
        {
            "VERDICT_HMAC_KEY": "{Xk9-secret-pass}",
            "REDIS_URL": "redis+sentinel://127.0.0.1:26379/edge",
            "REDIS_SENTINEL_PASSWORD": "[s3cret]",
            "EDGE_PROXY__LAYOUT__BILLING_DEDUPE_KEY": "{batch_id}",
            "EDGE_PROXY__SERVER_HEADER": "[edge]",
        },
    )
    assert settings.definitions.auth.hmac_key is not None
    assert settings.definitions.auth.hmac_key.get_secret_value() == "{Xk9-secret-pass}"
    assert settings.redis.sentinel_secret == "[s3cret]"
    assert settings.layout.billing_dedupe_key == "{batch_id}"
    assert settings.server_header == "[edge]"


def test_a_whole_section_can_be_set_from_one_variable() -> None:
    """As before collections alone were read as YAML (found by a reviewer of rolling upgrades: such a pod
    would have crash-looped on the new version)."""
    settings = load_settings(
        None,
        {
            "EDGE_PROXY__RATE_LIMITS": "{mode: exact, default: 100/minute}",
            "EDGE_PROXY__DEFINITIONS__OFFLOAD": "{weight_percent: 10}",
        },
    )
    assert (settings.rate_limits.mode, settings.rate_limits.default) == ("exact", "100/minute")
    assert settings.definitions.offload.weight_percent == 10


def test_top_level_generic_key() -> None:
    assert load_settings(None, {"EDGE_PROXY__SERVICE_MODE": "FLAGS"}).service_mode is ServiceMode.FLAGS


def test_unknown_keys_are_refused_with_their_path(tmp_path: Path) -> None:
    path = write(tmp_path, "upstream:\n  url: http://x\n  retries: 3\nmystery: 1\n")
    message = problems(path, {"EDGE_PROXY__REDIS__PASSWORD": "x"})
    assert "upstream.retries: unknown key" in message
    assert "mystery: unknown key" in message
    assert "redis.password (from $EDGE_PROXY__REDIS__PASSWORD): unknown key" in message
    assert message.startswith("invalid configuration (3 problems):")


def test_every_problem_in_one_message(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
service_mode: everything
upstream: {url: "not a url"}
rate_limits: {default: lots, team_overrides: {"1": "many/fortnight"}}
redis: {url: "http://wrong-scheme"}
workers: 0
shutdown_timeout_seconds: 0
definitions: {path: no-slash}
upstream_typo: 1
""",
    )
    message = problems(path)
    for key in (
        "service_mode",
        "upstream.url",
        "rate_limits.default",
        "rate_limits.team_overrides.1",
        "redis.url",
        "workers",
        "shutdown_timeout_seconds",
        "definitions.path",
        "upstream_typo",
    ):
        assert f"\n  {key}: " in message, key
    assert message.startswith("invalid configuration (9 problems):")
    assert "not a rate string like '600/minute': 'lots'" in message


def test_environment_problems_name_the_variable() -> None:
    message = problems(
        env={
            "UPSTREAM_URL": "ftp://backend",
            "SERVICE_MODE": "both",
            "WORKERS": "many",
            "LOG_LEVEL": "chatty",
            "EDGE_PROXY__RATE_LIMITS__DEFAULT": "fast",
        }
    )
    assert "upstream.url (from $UPSTREAM_URL): " in message
    assert "service_mode (from $SERVICE_MODE): " in message
    assert "workers (from $WORKERS): " in message
    assert "logging.level (from $LOG_LEVEL): " in message
    assert "rate_limits.default (from $EDGE_PROXY__RATE_LIMITS__DEFAULT): " in message


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://user:secret@backend:8000", "must not carry credentials"),
        ("http://backend:8000/?token=x", "must not have a query or fragment"),
        ("http://backend:8000/#top", "must not have a query or fragment"),
    ],
)
def test_upstream_url_is_a_plain_base(url: str, says: str) -> None:
    message = problems(env={"UPSTREAM_URL": url})
    assert "upstream.url (from $UPSTREAM_URL): " in message
    assert says in message
    assert "secret" not in message


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # The section is wrong (it is definitions.offload): the error is on `offload`, above the variable.
        (
            {"EDGE_PROXY__OFFLOAD__WEIGHT_PERCENT": "50"},
            "offload (from $EDGE_PROXY__OFFLOAD__WEIGHT_PERCENT)",
        ),
        ({"EDGE_PROXY__BIND__PORT": "1"}, "bind (from $EDGE_PROXY__BIND__PORT)"),
    ],
)
def test_an_error_above_the_variables_own_key_still_names_the_variable(
    env: dict[str, str], expected: str
) -> None:
    assert expected in problems(env=env)


def test_layout_templates_must_keep_their_placeholders() -> None:
    message = problems(env={"EDGE_PROXY__LAYOUT__TEAM_KEY": "team:{id}"})
    assert "layout (from $EDGE_PROXY__LAYOUT__TEAM_KEY): " in message
    assert "team_key must contain {token}" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("upstream: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_unusable_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    message = problems(path)
    assert str(path) in message
    assert expected in message


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        # A section repeated further down, to tune one key: PyYAML kept the last, the url went back to
        # its default and check-config said OK.
        (
            'redis:\n  url: "redis://:DupS3cret@redis.internal:6379/2"\nworkers: 2\n'
            "redis:\n  max_connections: 32\n",
            "redis",
            4,
        ),
        ("upstream:\n  read_timeout_seconds: 5\n  read_timeout_seconds: 50\n", "read_timeout_seconds", 3),
    ],
)
def test_a_key_written_twice_is_refused_by_line(tmp_path: Path, text: str, key: str, line: int) -> None:
    message = problems(write(tmp_path, text))
    assert "not valid YAML" in message
    assert f"found the key {key} a second time at line {line}, column " in message
    assert "DupS3cret" not in message


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        # pydantic took YAML's booleans for 1 and 0: one worker, a one-second drain, a pool of one.
        ("workers: yes\n", "workers", "true"),
        ("shutdown_timeout_seconds: on\n", "shutdown_timeout_seconds", "true"),
        ("redis:\n  max_connections: true\n", "redis.max_connections", "true"),
        (
            "definitions:\n  offload:\n    weight_percent: off\n",
            "definitions.offload.weight_percent",
            "false",
        ),
        ("bind: no\n", "bind", "false"),
    ],
)
def test_a_yaml_boolean_is_refused_where_a_number_or_text_goes(
    tmp_path: Path, text: str, key: str, value: str
) -> None:
    message = problems(write(tmp_path, text))
    assert (
        f"  {key}: Value error, YAML read the boolean {value} here (yes/no/on/off/true/false unquoted), "
        "which this key does not take"
    ) in message


def test_yaml_booleans_still_set_boolean_keys(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, "logging:\n  access_log: yes\nrate_limits:\n  enabled: off\n"), {}
    )
    assert settings.logging.access_log is True
    assert settings.rate_limits.enabled is False


def test_a_malformed_file_is_placed_by_line_without_quoting_its_text(tmp_path: Path) -> None:
    """PyYAML's own message quotes the lines around the problem: here, a Redis password."""
    path = write(tmp_path, 'redis:\n  url: "redis://:YamlS3cretPw@127.0.0.1:6379/0\nupstream: {}\n')
    message = problems(path)
    assert "YamlS3cretPw" not in message
    assert message.startswith(f"config file {path}: not valid YAML: ")
    assert message.endswith(
        "while scanning a quoted scalar at line 2, column 8: "
        "found unexpected end of stream at line 4, column 1"
    )


@pytest.mark.parametrize(
    "text",
    [
        "definitions:\n  auth:\n    hmac_key: *Sup3rS3cretHmacKey0123\n",  # an undefined alias
        "redis:\n  url: !Pa55w0rdTag redis://127.0.0.1:6379/0\n",  # an unknown tag
        "redis:\n  password: &anchor\n  url: *Sup3rS3cret'Quote\n",
    ],
)
def test_a_malformed_file_never_quotes_the_name_yaml_stumbled_on(tmp_path: Path, text: str) -> None:
    """Found by a reviewer: a secret written unquoted that begins with `*`, `&` or `!` is a YAML alias, anchor
    or tag, and PyYAML's message names it."""
    message = problems(write(tmp_path, text))
    assert "not valid YAML" in message
    assert "S3cret" not in message
    assert "Pa55w0rd" not in message
    assert " at line " in message


def test_a_file_that_is_not_utf8_is_refused_by_name(tmp_path: Path) -> None:
    """A Latin-1 file with a password holding "ä": a traceback (exit 1), not the refusal naming the file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b'redis:\n  url: "redis://:p\xe4ss@127.0.0.1:6379/0"\n')
    assert problems(path) == f"config file {path}: not UTF-8 (byte 25)"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems(path) == f"config file {path}: No such file or directory"


def test_settings_are_frozen() -> None:
    settings = load_settings(None, {})
    with pytest.raises(ValueError, match="frozen"):
        settings.workers = 2


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://:s3cret@host:notaport/0", "no host and port it can read"),
        ("redis://:s3cret@host:99999/0", "no host and port it can read"),
        ("redis://user:s3cret/pa@host:6379/0", "or non-ASCII character in a password is %-encoded"),
        ("redis://user:p\u00e4ssword\uff0fs3cret@host:6379/0", "no host and port it can read"),
        ("rediss://:s3cret@host:6379/0?ssl_cert_reqs=bogus", "a query option redis-py refuses (RedisError)"),
        ("redis://:s3cret@host:6379/abc", "the database (the URL's path) must be a number"),
        ("rediss://:s3cret@host:6379/0?foo=bar", "the query option 'foo' is not one a URL can set here"),
        ("redis://:s3cret@host:6379/0?protocol=x", "Invalid value for 'protocol'"),
        # An unescaped "?" in the password: the option named was the rest of the password.
        ("redis://user:pa?s3cret=x@host:6379/0", "or non-ASCII character in a password is %-encoded"),
        ("redis://user:pa?a=1&s3cret=x@host:6379/0", "or non-ASCII character in a password is %-encoded"),
        # And a "#" after it, which moved the "@" out of the query into the fragment (a reviewer's).
        ("redis://:pa?s3cret=1#q@host:6379/0", "'?', '#' or non-ASCII character in a password is %-encoded"),
        ("redis://:pa?s3cret=1&b=2#q@h:6379/0", "'?', '#' or non-ASCII character in a password is %-encoded"),
        # And a "/" before the "?": the path is not empty, and the option named was the password's (diff2).
        ("redis://:ab/cd?s3cret=1@host:6379/0", "'?', '#' or non-ASCII character in a password is %-encoded"),
        (
            "redis://u:p/w?timeout=s3cret@h:6379/0",
            "'?', '#' or non-ASCII character in a password is %-encoded",
        ),
        # The proxy's own: redis-py lets the URL's win, which unbounded every call (3 s on a 0.5 s timeout)...
        ("redis://:s3cret@host:6379/0?socket_timeout=3", "'socket_timeout' is set by redis.timeout_seconds"),
        ("rediss://:s3cret@host/0?timeout=30", "'timeout' is set by redis.timeout_seconds"),
        ("unix:///r.sock?max_connections=500", "'max_connections' is set by redis.max_connections"),
        # ...or decoded every value ("false" is a non-empty string).
        ("redis://:s3cret@host:6379/0?decode_responses=false", "'decode_responses' is set by the proxy"),
        # redis-py crashed reading these (an AttributeError traceback, exit 1; found by a reviewer).
        ("redis://:s3cret@host:6379/0?retry=1", "'retry' is set by the proxy"),
        (
            "redis://:s3cret@host:6379/0?maint_notifications_config=x",
            "'maint_notifications_config' is not one",
        ),
        # Options redis-py takes as objects: check-config passed them and serve crashed (found by a reviewer).
        (
            "redis://:s3cret@host:6379/0?credential_provider=x",
            "'credential_provider' is not one a URL can set",
        ),
        ("redis://:s3cret@host:6379/0?redis_connect_func=x", "'redis_connect_func' is not one a URL can set"),
        # ... or that passed and left serve crashing or never connecting (found by a reviewer).
        ("redis://:s3cret@host:6379/0?encoding=bogus", "'encoding' is not one a URL can set"),
        ("redis://:s3cret@host:6379/0?socket_read_size=0", "'socket_read_size' is not one a URL can set"),
        ("redis://:s3cret@host:6379/0?client_name=has%20space", "'client_name' must be visible ASCII"),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_refused_naming_the_key(url: str, says: str) -> None:
    """Each of these passed the check and then crashed `serve` at its first connection."""
    message = problems(env={"REDIS_URL": url})
    assert "redis.url (from $REDIS_URL): " in message
    assert says in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://host:6379/0",
        "redis://host",
        "rediss://:pw@host:6380/15?ssl_cert_reqs=none",
        "unix:///r.sock?db=2",
        "redis://host:6379/0?protocol=3&socket_keepalive=true",
        "redis://host:6379/0?client_name=edge@pod-1",  # an "@" in a query value, no password in sight
    ],
)
def test_redis_urls_redis_py_reads_are_accepted(url: str) -> None:
    assert load_settings(None, {"REDIS_URL": url}).redis.url == url


@pytest.mark.parametrize(
    "variable",
    [
        "EDGE_PROXY__REDIS__TIMEOUT_SECONDS",
        "SHUTDOWN_TIMEOUT_SECONDS",
        "EDGE_PROXY__BILLING__FLUSH_INTERVAL_SECONDS",
        "EDGE_PROXY__UPSTREAM__READ_TIMEOUT_SECONDS",
    ],
)
@pytest.mark.parametrize("value", ["inf", "Infinity", "nan"])
def test_durations_must_be_finite(variable: str, value: str) -> None:
    message = problems(env={variable: value})
    assert f"(from ${variable}): Input should be a finite number" in message


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"EDGE_PROXY__TELEMETRY__METRICS_PATH": "/flags/definitions"},
            "telemetry.metrics_path: '/flags/definitions' is already the route of definitions.path",
        ),
        (
            {"EDGE_PROXY__DEFINITIONS__PATH": "/_readiness"},
            "definitions.path: '/_readiness' is already the route of the health probes",
        ),
        (
            {"EDGE_PROXY__DEFINITIONS__ALIASES": "[/flags/definitions]"},
            "definitions.aliases: '/flags/definitions' is already the route of definitions.path",
        ),
        (
            {"EDGE_PROXY__TELEMETRY__METRICS_PATH": "/_startup"},
            "telemetry.metrics_path: '/_startup' is already the route of the health probes",
        ),
    ],
)
def test_two_features_on_one_route_are_refused(env: dict[str, str], problem: str) -> None:
    assert problem in problems(env=env)


def test_every_problem_across_sections_is_named_at_once() -> None:
    """Each check across sections stopped at its first problem, and the first check to fail hid the others
    (found by a reviewer)."""
    message = problems(
        env={
            "REDIS_URL": "redis+cluster://127.0.0.1:7000",
            "EDGE_PROXY__LAYOUT__BILLING_DEDUPE_KEY": "{x}:{batch_id}",
            "EDGE_PROXY__RATE_LIMITS__KEY_PREFIX": "{rl}",
            "EDGE_PROXY__DEFINITIONS__PATH": "/_liveness",
            "EDGE_PROXY__DEFINITIONS__ALIASES": "[/_startup]",
            "EDGE_PROXY__TELEMETRY__WORKER_METRICS_PORT": "8080",
        }
    )
    assert message.startswith("invalid configuration (5 problems):\n")
    for problem in (
        "layout.billing_dedupe_key may hold no brace besides {batch_id}",
        "rate_limits.key_prefix may hold no brace",
        "definitions.path: '/_liveness' is already the route of the health probes",
        "definitions.aliases: '/_startup' is already the route of the health probes",
        "telemetry.worker_metrics_port: port 8080 for 1 worker would take bind's port 8080",
    ):
        assert f"\n  {problem}" in message


def test_metrics_off_frees_its_route() -> None:
    env = {
        "EDGE_PROXY__TELEMETRY__METRICS_ENABLED": "false",
        "EDGE_PROXY__TELEMETRY__METRICS_PATH": "/_startup",
    }
    assert not load_settings(None, env).telemetry.metrics_enabled


def test_an_otlp_endpoint_without_its_exporter_installed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image installs no extra by default: the endpoint set for the pod's other apps would crash it."""
    real = importlib.util.find_spec

    def without_otlp(name: str, *args: Any) -> Any:
        return None if name.startswith("opentelemetry.exporter.otlp") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_otlp)
    message = problems(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert "telemetry.otlp_endpoint (from $OTEL_EXPORTER_OTLP_ENDPOINT): " in message
    assert "needs the otlp extra" in message
    monkeypatch.undo()
    endpoint = load_settings(
        None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    ).telemetry.otlp_endpoint
    assert str(endpoint) == "http://collector:4318/"


@pytest.mark.parametrize("endpoint", ["http://collector:4318/otlp?tenant=acme", "http://collector:4318/#x"])
def test_an_otlp_endpoint_with_a_query_or_fragment_is_refused(endpoint: str) -> None:
    """Found by a reviewer: /v1/metrics went after the query ("?tenant=acme/v1/metrics": every export a
    collector's 404) and the exporter's warnings logged the query, a key in it too."""
    message = problems(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert "telemetry.otlp_endpoint (from $OTEL_EXPORTER_OTLP_ENDPOINT): " in message
    assert "must not have a query or fragment" in message


@pytest.mark.parametrize("endpoint", ["http://user:s3cret@collector:4318", "http://token@collector:4318"])
def test_an_otlp_endpoint_with_credentials_is_refused(endpoint: str, tmp_path: Path) -> None:
    """As upstream.url: the config file is a ConfigMap, readable in clear, and the exporter logs the endpoint
    (found by a reviewer of the chart); the collector's credentials go in OTEL_EXPORTER_OTLP_HEADERS."""
    message = problems(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    assert "telemetry.otlp_endpoint (from $OTEL_EXPORTER_OTLP_ENDPOINT): " in message
    assert "must not carry credentials" in message
    assert "s3cret" not in message
    config = tmp_path / "config.yaml"
    config.write_text(f"telemetry:\n  otlp_endpoint: {endpoint}\n", encoding="utf-8")
    message = problems(config)
    assert "telemetry.otlp_endpoint" in message
    assert "must not carry credentials" in message
    assert "s3cret" not in message


def test_an_otlp_headers_entry_the_exporters_would_drop_is_refused_without_showing_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`Authorization: Bearer <key>` (a colon, as in HTTP) was dropped by the exporters with a warning at
    start, and every export went unauthorized; the process started all the same."""
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    malformed = {
        "OTEL_EXPORTER_OTLP_HEADERS": "X-Tenant=acme, Authorization: Bearer OTLPSECRETMARK ,X-A=b",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a:OTLPSECRETMARK,b:OTLPSECRETMARK",
    }
    message = problems(env={**endpoint, **malformed, "EDGE_PROXY__TELEMETRY__TRACE_SAMPLING_RATIO": "0.5"})
    assert message == (
        "invalid configuration (2 problems):\n"
        "  $OTEL_EXPORTER_OTLP_HEADERS: entry 2 of 3 is not name=value, URL-encoded"
        " (Authorization=Bearer%20<key>; not shown: it can hold a credential)\n"
        "  $OTEL_EXPORTER_OTLP_TRACES_HEADERS: entries 1, 2 of 2 are not name=value, URL-encoded"
        " (Authorization=Bearer%20<key>; not shown: it can hold a credential)"
    )
    assert "OTLPSECRETMARK" not in caplog.text
    # Only what a running exporter reads: no traces exporter unsampled, a signal's own variable before the
    # shared one (set for the pod's other containers, say), nothing without an endpoint.
    assert problems(env={**endpoint, **malformed}).count("\n  $") == 1
    good = {
        **endpoint,
        **malformed,
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "Authorization=Bearer%20k, x = y z,,",
    }
    assert str(load_settings(None, good).telemetry.otlp_endpoint) == "http://collector:4318/"
    assert load_settings(None, {"OTEL_EXPORTER_OTLP_HEADERS": "a:b"}).telemetry.otlp_endpoint is None


def test_a_worker_timeout_shorter_than_a_workers_start_is_refused() -> None:
    """A worker's first heartbeat comes once it has imported everything (~1 s): 0.9 killed every worker
    in a loop until the supervisor gave up (found by a review)."""
    message = problems(env={"EDGE_PROXY__WORKER_TIMEOUT_SECONDS": "4.9"})
    assert "worker_timeout_seconds (from $EDGE_PROXY__WORKER_TIMEOUT_SECONDS): " in message
    assert load_settings(None, {"EDGE_PROXY__WORKER_TIMEOUT_SECONDS": "5"}).worker_timeout_seconds == 5


def test_an_empty_otel_endpoint_is_unset_as_the_sdks_read_it() -> None:
    assert load_settings(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).telemetry.otlp_endpoint is None


@pytest.mark.parametrize(
    ("interval", "kept"),
    [("30", 1000), ("86.4", 999), ("90", 959), ("120", 719), ("43200", 1), ("86399", 1)],
)
def test_batches_are_kept_pending_for_less_than_their_dedupe_mark_lives(interval: str, kept: int) -> None:
    billing = load_settings(None, {"EDGE_PROXY__BILLING__FLUSH_INTERVAL_SECONDS": interval}).billing
    assert billing.max_pending_batches == 1000
    assert billing.pending_batches_kept == kept
    assert billing.pending_batches_kept * billing.flush_interval_seconds < 86400


def test_an_override_inside_a_file_value_that_is_no_section_is_refused(tmp_path: Path) -> None:
    """The file's mistake (a URL where the redis section goes) used to vanish under REDIS_URL."""
    message = problems(write(tmp_path, 'redis: "redis://wrong"\n'), {"REDIS_URL": "redis://redis:6379/0"})
    assert "invalid configuration (2 problems):" in message
    assert "  redis: Input should be a valid dictionary" in message
    assert "  redis.url (from $REDIS_URL): inside a key that holds a value, not a section" in message


def test_an_empty_file_section_takes_environment_overrides(tmp_path: Path) -> None:
    """`redis:` with every key commented out (the URL comes from a Secret) is YAML's null, not a mistake."""
    path = write(tmp_path, "redis:\n  # url: from the Secret\n")
    assert load_settings(path, {"REDIS_URL": "redis://redis:6379/0"}).redis.url == "redis://redis:6379/0"


def test_empty_file_sections_are_their_defaults_and_empty_values_still_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "redis:\nrate_limits:\ndefinitions:\n  auth:\n")
    settings = load_settings(path, {})
    assert settings.redis == RedisSettings()
    assert settings.definitions.auth == DefinitionsSettings().auth
    assert "workers: Input should be a valid integer" in problems(write(tmp_path, "workers:\n"))


def test_a_flush_interval_of_a_day_is_refused() -> None:
    """A batch retried a day after it was written would find its dedupe mark gone, and count twice."""
    message = problems(env={"EDGE_PROXY__BILLING__FLUSH_INTERVAL_SECONDS": "86400"})
    assert "billing.flush_interval_seconds (from $EDGE_PROXY__BILLING__FLUSH_INTERVAL_SECONDS): " in message
    assert "Input should be less than 86400" in message


def test_a_merge_key_is_still_read_and_an_explicit_key_overrides_it(tmp_path: Path) -> None:
    """YAML's `<<:` merge keys, which yaml.safe_load always read: the duplicate-key check took the merge key
    for an ordinary one and refused the file ("could not determine a constructor for the tag '…'")."""
    settings = load_settings(
        write(
            tmp_path,
            "rate_limits:\n  team_overrides:\n    <<: {'2': 10/second, '3': 10/second}\n    '3': 20/second\n",
        ),
        environ={},
    )
    assert dict(settings.rate_limits.team_overrides) == {"2": "10/second", "3": "20/second"}
    # A key written twice beside a merge is still refused.
    twice = "redis:\n  <<: {timeout_seconds: 1}\n  max_connections: 3\n  max_connections: 4\n"
    message = problems(write(tmp_path, twice))
    assert "found the key max_connections a second time" in message
