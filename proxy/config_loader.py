"""Loading the settings: the YAML file, then environment overrides, validated once; every problem named."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_origin

import yaml
from opentelemetry.util.re import parse_env_headers
from pydantic import BaseModel, ValidationError

from proxy.settings import ConfigError, Settings

# Plain environment variables, as a Kubernetes sidecar is configured. Any other key can be set with
# EDGE_PROXY__<SECTION>__<KEY> (double underscores between levels).
ENV_ALIASES: Mapping[str, tuple[str, ...]] = {
    "UPSTREAM_URL": ("upstream", "url"),
    "REDIS_URL": ("redis", "url"),
    "SERVICE_MODE": ("service_mode",),
    "BIND": ("bind",),
    "WORKERS": ("workers",),
    "LOG_LEVEL": ("logging", "level"),
    "LOG_FORMAT": ("logging", "format"),
    "SHUTDOWN_TIMEOUT_SECONDS": ("shutdown_timeout_seconds",),
    "VERDICT_HMAC_KEY": ("definitions", "auth", "hmac_key"),
    "REDIS_SENTINEL_PASSWORD": ("redis", "sentinel_password"),
    # The OpenTelemetry SDKs' own variable, so a collector configured for the pod's other apps applies here.
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("telemetry", "otlp_endpoint"),
}
ENV_PREFIX = "EDGE_PROXY__"
# Where the OTLP exporters read a collector's headers: a signal's own variable, else (unset or empty) the
# shared one.
OTLP_SHARED_HEADERS = "OTEL_EXPORTER_OTLP_HEADERS"
OTLP_SIGNAL_HEADERS = {
    "metrics": "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    "traces": "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
}


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, str]]:
    found: dict[tuple[str, ...], tuple[str, str]] = {}
    for name, path in ENV_ALIASES.items():
        if name == "OTEL_EXPORTER_OTLP_ENDPOINT" and not environ.get(name):
            continue  # empty is unset, as the OpenTelemetry SDKs read it
        if name in environ:
            found[path] = (name, environ[name])
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            path = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            found[path] = (name, value)
    return found


def _empty_sections_as_mappings(tree: dict[str, Any], model: type[BaseModel]) -> None:
    """A section left empty in the file (`redis:`, every key under it commented out) is YAML's null: the
    section's defaults, as if it were absent. Only for keys that are sections: an empty value is still one."""
    for name, field in model.model_fields.items():
        section = field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)) or name not in tree:
            continue
        if tree[name] is None:
            tree[name] = {}
        if isinstance(tree[name], dict):
            _empty_sections_as_mappings(tree[name], section)


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> bool:
    """Set `value` at `path`; False, leaving the tree as it is, when a part of the path already holds a
    value that is no section (a file's `redis: "redis://..."`, say): validation then names that key, rather
    than the override silently replacing the file's mistake."""
    for part in path[:-1]:
        child = tree.get(part)
        if (
            child is None
        ):  # absent, or a section left empty in the file (`redis:` with its keys commented out)
            child = tree[part] = {}
        elif not isinstance(child, dict):
            return False
        tree = child
    tree[path[-1]] = value
    return True


def _is_collection(path: tuple[str, ...]) -> bool:
    """Whether the settings key at `path` holds a list, a mapping or a whole section (False for a path that
    names no key)."""
    model: type[BaseModel] = Settings
    for part in path[:-1]:
        field = model.model_fields.get(part)
        section = None if field is None else field.annotation
        if not (isinstance(section, type) and issubclass(section, BaseModel)):
            return False
        model = section
    field = model.model_fields.get(path[-1])
    if field is None:
        return False
    kind = field.annotation
    return get_origin(kind) in (tuple, list, dict) or (isinstance(kind, type) and issubclass(kind, BaseModel))


def _env_value(raw: str) -> Any:
    # Flow collections are parsed, so `EDGE_PROXY__RATE_LIMITS__ALLOWLIST='[1, 2]'` works; BaseLoader keeps
    # every scalar a string (no YAML 1.1 "on" -> True, "0x10" -> 16) and pydantic converts it to the field's
    # type, as it does for a plain value.
    if not raw.lstrip().startswith(("[", "{")):
        return raw
    try:
        return yaml.load(raw, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds only str/list/dict
    except yaml.YAMLError:
        return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key written twice in one mapping: PyYAML keeps the last silently,
    so a section repeated further down (`redis:` again, to tune one key) replaced the whole first one, its url
    included, with defaults, and check-config said OK."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: flatten_mapping merges it (an explicit key overrides, as in YAML)
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # SafeLoader refuses an unhashable key itself
            if key in seen:
                # Unquoted: _yaml_problem hides what is quoted (a value could be a secret; a key is a name).
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key} a second time",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, without the snippet of the file its message quotes (the file can
    hold a Redis URL with its password, or an HMAC key)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    parts = [
        f"{_QUOTED.sub(_unquoted, text)}"
        f"{f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''}"
        for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark))
        if text
    ]
    return ": ".join(parts) or type(exc).__name__


# PyYAML's messages quote what they stumbled on: an undefined alias's or unknown tag's name, which is a
# password or key that begins with `*`, `&` or `!` written unquoted (found by a reviewer). Kept: a single
# character (escaped too) and the names of its own tokens (`'<block end>'`).
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _unquoted(match: re.Match[str]) -> str:
    quoted = match.group(0)
    character = len(quoted) <= 3 or (len(quoted) <= 6 and quoted[1] == "\\")  # 'x', '\t', '\x00'
    return quoted if character or quoted[1] == "<" else f"{quoted[0]}…{quoted[0]}"


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML file (if any), apply environment overrides, validate; ConfigError on any problem."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path}: not UTF-8 (byte {exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML: {_yaml_problem(exc)}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
        tree = loaded
        _empty_sections_as_mappings(tree, Settings)
    sources: dict[tuple[str, ...], str] = {}
    unplaced: list[str] = []
    for key_path, (name, raw) in _env_overrides(environ).items():
        # YAML flow syntax only for a key that holds a list, a mapping or a whole section: a secret or a
        # template that begins with "{" or "[" is a string (read as YAML, `{Xk9-secret}` was refused as no
        # string; found by a reviewer). Scalars go as the strings they are, converted by their field's type.
        if _set_path(tree, key_path, _env_value(raw) if _is_collection(key_path) else raw):
            sources[key_path] = name
        else:
            unplaced.append(
                f"  {'.'.join(key_path)} (from ${name}): inside a key that holds a value, not a section"
            )
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe([*_problems(exc, sources), *unplaced])) from exc
    telemetry = settings.telemetry
    if telemetry.otlp_endpoint is not None:
        # The exporters that will run: metrics when enabled, traces when sampled.
        running = {"metrics": telemetry.metrics_enabled, "traces": telemetry.trace_sampling_ratio > 0}
        signals = [signal for signal, on in running.items() if on]
        unplaced += _otlp_header_problems(environ, signals)
    if unplaced:
        raise ConfigError(_describe(unplaced))
    return settings


class _Quiet(logging.Filter):
    """Drops every record: the SDK's warning while an entry is tried quotes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _otlp_header_problems(environ: Mapping[str, str], signals: list[str]) -> list[str]:
    """Entries of the collector's headers the exporters of `signals` would drop: `Authorization: Bearer
    <key>` (a colon, as in HTTP) left every export unauthorized, with one warning at start. Only a variable an
    exporter reads is checked (one set for other containers of the pod is not this proxy's). Each entry is
    tried as the exporters parse it; the SDK's own warning, which quotes the entry, is held back and no entry
    is shown."""
    read = dict.fromkeys(
        OTLP_SIGNAL_HEADERS[signal] if environ.get(OTLP_SIGNAL_HEADERS[signal]) else OTLP_SHARED_HEADERS
        for signal in signals
    )
    lines = []
    quiet, sdk = _Quiet(), logging.getLogger("opentelemetry.util.re")
    sdk.addFilter(quiet)
    try:
        for name in read:
            entries = [entry for entry in environ.get(name, "").split(",") if entry.strip()]
            refused = [
                str(n) for n, entry in enumerate(entries, 1) if not parse_env_headers(entry, liberal=True)
            ]
            if refused:
                which = (
                    f"entry {refused[0]} of {len(entries)} is"
                    if len(refused) == 1
                    else (f"entries {', '.join(refused)} of {len(entries)} are")
                )
                lines.append(
                    f"  ${name}: {which} not name=value, URL-encoded (Authorization=Bearer%20<key>;"
                    " not shown: it can hold a credential)"
                )
    finally:
        sdk.removeFilter(quiet)
    return lines


def _describe(lines: list[str]) -> str:
    return f"invalid configuration ({len(lines)} problem{'s' * (len(lines) != 1)}):\n" + "\n".join(lines)


def _problems(exc: ValidationError, sources: Mapping[tuple[str, ...], str]) -> list[str]:
    lines = []
    for error in exc.errors():
        key_path = tuple(str(part) for part in error["loc"])
        key = ".".join(key_path) or "<root>"
        # The variable set at or below the key at fault (an unknown section, EDGE_PROXY__OFFLOAD__..., is an
        # error on `offload`, above the variable's own path).
        origin = next(
            (
                f" (from ${name})"
                for p, name in sources.items()
                if key_path[: len(p)] == p or (key_path and p[: len(key_path)] == key_path)
            ),
            "",
        )
        if not key_path and error["type"] == "value_error":
            # The checks across sections (the model's validator): each line names its keys itself.
            lines += [f"  {line}" for line in str(error["ctx"]["error"]).splitlines()]
            continue
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        lines.append(f"  {key}{origin}: {message}")
    return lines
