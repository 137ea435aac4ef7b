"""Redis URLs: the schemes edge-proxy reads (redis, rediss, unix, Sentinel, Cluster) and their checks."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import BlockingConnectionPool
from redis.exceptions import RedisError

# redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]: the master that Sentinel names.
SENTINEL_SCHEME = "redis+sentinel://"
_SENTINEL_FORM = (
    "must be redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db] (no query)"
)
# redis+cluster://[user:password@]host:port[,host:port...]: a Redis Cluster, discovered from any listed node
# (the scheme `limits` uses too; database 0 only, so no path).
CLUSTER_SCHEME = "redis+cluster://"
_CLUSTER_FORM = "must be redis+cluster://[user:password@]host:port[,host:port...] (ports 1-65535, no path)"


def _host_ports(hosts: str, form: str) -> list[tuple[str, int]]:
    """`host:port[,host:port...]` (IPv6 hosts in brackets) as pairs; ValueError(form) if any is malformed."""
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not (colon and host and port.isascii() and port.isdigit() and 0 < int(port) <= 65535):
            raise ValueError(form)
        nodes.append((host, int(port)))
    return nodes


def cluster_nodes(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """Startup nodes, username and password of a redis+cluster:// URL; ValueError if it is malformed."""
    userinfo, _, rest = url[len(CLUSTER_SCHEME) :].rpartition("@")
    hosts, _, path = rest.partition("/")
    if path or not url.startswith(CLUSTER_SCHEME) or any(c in rest for c in "?#"):
        raise ValueError(_CLUSTER_FORM)
    username, _, password = userinfo.partition(":")
    return _host_ports(hosts, _CLUSTER_FORM), unquote(username) or None, unquote(password) or None


class SentinelParts(NamedTuple):
    """What a redis+sentinel:// URL names: the sentinels, and the master's service, db and credentials."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None


def sentinel_parts(url: str) -> SentinelParts:
    """The parts of a redis+sentinel:// URL; ValueError if it is malformed."""
    netloc, _, path = url[len(SENTINEL_SCHEME) :].partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    service, _, db = path.strip("/").partition("/")
    nodes = _host_ports(hosts, _SENTINEL_FORM)
    # A query would be read as part of the service name or db (`/edge?db=5`: a master never found).
    if not service or not ((db.isascii() and db.isdigit()) or not db) or any(c in path for c in "?#"):
        raise ValueError(_SENTINEL_FORM)
    username, _, password = userinfo.partition(":")
    return SentinelParts(nodes, service, int(db or 0), unquote(username) or None, unquote(password) or None)


def _safe_reason(exc: Exception) -> str:
    """redis-py's (or urllib's) complaint about a URL, when it cannot quote the password: an option's name
    or value. Others (a port or netloc message quotes what it read, which can be part of a password holding
    an unescaped '/' or '@') become a general one."""
    reason = str(exc)
    if isinstance(exc, TypeError) and "unexpected keyword argument" in reason:
        return "an unknown query option" + reason[reason.index("argument") + len("argument") :]
    if reason.startswith(("Invalid value for '", "Redis URL must specify")):
        return reason
    if isinstance(exc, RedisError | AttributeError):
        return f"a query option redis-py refuses ({type(exc).__name__})"
    return (
        "no host and port it can read (a '/', '@', ':', '?', '#' or non-ASCII character in a password is "
        "%-encoded)"
    )


# Options of a redis://, rediss:// or unix:// URL's query that the proxy sets itself. redis-py lets the URL's
# win over the client's arguments, so `?socket_timeout=3` (common in a shared REDIS_URL) would have unbounded
# every call past redis.timeout_seconds, and `?decode_responses=false` (a string, so true) broken every read.
_OWNED_QUERY_OPTIONS = {
    "socket_timeout": "set by redis.timeout_seconds",
    "socket_connect_timeout": "set by redis.timeout_seconds",
    "timeout": "set by redis.timeout_seconds",
    "max_connections": "set by redis.max_connections",
    "health_check_interval": "set by the proxy (its health monitor: redis.health_check_interval_seconds)",
    "decode_responses": "set by the proxy (values are bytes)",
    "retry": "set by the proxy (one immediate retry)",
}


# What a redis://, rediss:// or unix:// URL's query may set: the options redis-py parses from a URL, and those
# it takes as strings. Others it passes on as strings where it wants objects (`?credential_provider=x`,
# `?redis_connect_func=x`): check-config said OK and serve crashed at its first connection (found by a
# reviewer).
# Not among them: encoding (values are bytes here; `?encoding=bogus` crashed serve), socket_read_size (0
# left Redis unreachable for good), the client library's name and version.
_URL_OPTIONS = frozenset(
    {
        *("db", "protocol", "legacy_responses", "socket_keepalive"),
        *("retry_on_error", "retry_on_timeout", "client_name", "username", "password"),
        *("ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path"),
        *("ssl_ciphers", "ssl_password", "ssl_check_hostname", "ssl_min_version"),
        *("ssl_include_verify_flags", "ssl_exclude_verify_flags"),
    }
)


def check_redis_url(value: str) -> str:
    """`value` if edge-proxy can use it as redis.url; ValueError saying why not (never quoting a password)."""
    schemes = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME, CLUSTER_SCHEME)
    if not value.startswith(schemes):
        raise ValueError(f"must start with one of {', '.join(schemes)}")
    if value.startswith(CLUSTER_SCHEME):
        cluster_nodes(value)
    elif value.startswith(SENTINEL_SCHEME):
        sentinel_parts(value)
    else:
        # redis-py's own reading of the URL, as the app's pool will read it (port, query options), so a URL
        # it cannot use fails here, naming the key, not at the first connection. Its port message quotes what
        # it read as the port, which is part of the password when that holds an unescaped "/": not repeated.
        # The proxy's own options first: redis-py crashes on some (`?retry=1`, an AttributeError).
        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("redis-py cannot use this URL: " + _safe_reason(ValueError())) from None
        if not parts.path and "@" in parts.query + parts.fragment and "@" not in parts.netloc:
            # An unescaped "?" (or "#") in the password began the query (or the fragment, which a "#" after
            # the "?" moves the "@" into), so the path is empty: its option names would be the password's.
            # (An "@" in a query value after a database path, `?client_name=a@b`, is no password's.)
            raise ValueError("redis-py cannot use this URL: " + _safe_reason(ValueError()))
        # An "@" past the authority with none in it: the query may begin inside a password (an unescaped "/"
        # then "?": `redis://:ab/cd?ef=gh@host/0`), so an option name is never quoted then.
        password_in_query = "@" not in parts.netloc and "@" in parts.path + parts.query + parts.fragment
        for option, values in parse_qs(parts.query).items():
            if password_in_query and (option not in _URL_OPTIONS or option in _OWNED_QUERY_OPTIONS):
                raise ValueError("redis-py cannot use this URL: " + _safe_reason(ValueError()))
            if option in _OWNED_QUERY_OPTIONS:
                raise ValueError(f"the query option {option!r} is {_OWNED_QUERY_OPTIONS[option]}: remove it")
            if option not in _URL_OPTIONS:
                raise ValueError(f"the query option {option!r} is not one a URL can set here")
            if option == "client_name" and not all(v and all("!" <= c <= "~" for c in v) for v in values):
                # Redis refuses a name with a space (CLIENT SETNAME): every connection failed.
                raise ValueError("the query option 'client_name' must be visible ASCII without spaces")
        try:
            BlockingConnectionPool.from_url(value).make_connection()  # type: ignore[no-untyped-call]
        # AttributeError: an option redis-py takes for an object (`?maint_notifications_config=x`).
        except (ValueError, TypeError, AttributeError, RedisError) as exc:
            raise ValueError(f"redis-py cannot use this URL: {_safe_reason(exc)}") from None
        path = parts.path.strip("/")
        if not value.startswith("unix://") and path and not (path.isascii() and path.isdigit()):
            raise ValueError("the database (the URL's path) must be a number")
    return value
