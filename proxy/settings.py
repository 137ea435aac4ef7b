"""Typed, frozen settings: every key, its default and its checks (proxy/config_loader.py reads them in)."""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import re
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, get_args

from limits import parse as parse_rate
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxy.redis_urls import CLUSTER_SCHEME, SENTINEL_SCHEME, check_redis_url


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending key."""


class ServiceMode(StrEnum):
    """Which route groups the proxy answers itself (contract §1)."""

    ALL = "all"
    DEFINITIONS = "definitions"
    FLAGS = "flags"


def _rate(value: str) -> str:
    try:
        parse_rate(value)
    except ValueError as exc:
        raise ValueError(f"not a rate string like '600/minute': {value!r}") from exc
    return value


# How long a process's billing batch mark lives in Redis (renewed by each write): what keeps a retried batch
# from counting twice, so no batch may stay pending this long.
BILLING_DEDUPE_TTL_SECONDS = 86400


# Liveness, readiness, startup (proxy/health.py): answered in every mode, so no other route may take them.
# An IPv4 address or a host name (letters, digits, dots, hyphens), as `bind` may name one.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
HEALTH_PATHS = ("/_liveness", "/_readiness", "/_startup")


# JSON-schema patterns. The chart's values.schema.json is generated from this model (tests/test_chart.py):
# with them `helm install` refuses what the validators here would refuse at the pod's start (a crash loop
# after a "successful" install). The validators stay the check; tests/test_chart.py runs values past both.


def _any_case(word: str) -> str:
    return "".join(f"[{c}{c.upper()}]" for c in word)


def _pattern(pattern: str) -> Any:
    """A Field that puts `pattern` in the JSON schema only (the loader's own validator gives the message)."""
    return Field(json_schema_extra={"pattern": pattern})


# limits' notation as its parser reads it (any case; "600/minute", "10 per second", "1/2 hours", several
# joined by , ; or |).
_UNITS = "|".join(_any_case(unit) for unit in ("second", "minute", "hour", "day", "month", "year"))
_ONE_RATE = rf"\s*[0-9]+\s*(/|\s*{_any_case('per')}\s*)\s*[0-9]*\s*({_UNITS})[sS]?\s*"
RATE_PATTERN = rf"^{_ONE_RATE}([,;|]{_ONE_RATE})*$"
# http(s)://host[:port][/path]: no user:password@ (nothing before the host), no query, no fragment.
PLAIN_HTTP_URL_PATTERN = r"^[hH][tT][tT][pP][sS]?://[^/?#@]+(/[^?#]*)?$"
# An approximation of ipaddress.ip_network(strict=False), which the validator still applies: IPv4 with a
# prefix length or a dotted mask, or what looks like IPv6 (hex digits and colons) with a prefix length.
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(\.{_OCTET}){{3}}"
_IPV6 = r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*"
NETWORK_PATTERN = rf"^({_IPV4}(/(3[0-2]|[12]?[0-9]|{_IPV4}))?|{_IPV6}(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$"

RateString = Annotated[str, AfterValidator(_rate), _pattern(RATE_PATTERN)]
# A route on bind's port.
Route = Annotated[str, _pattern("^/")]
Network = Annotated[str, _pattern(NETWORK_PATTERN)]
RedisUrl = Annotated[str, AfterValidator(check_redis_url)]
# Finite: an infinite timeout or interval would unbound what the README promises is bounded.
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off/true/false as booleans, and pydantic took one for the number 1 or 0:
        # `workers: yes` ran one worker, `shutdown_timeout_seconds: on` drained for a second.
        if isinstance(value, bool) and info.field_name is not None:
            kind = cls.model_fields[info.field_name].annotation
            if kind is not bool and bool not in get_args(kind):
                raise ValueError(
                    f"YAML read the boolean {str(value).lower()} here (yes/no/on/off/true/false unquoted), "
                    "which this key does not take"
                )
        return value


class UpstreamSettings(_Section):
    """Where misses and unknown routes go, and how."""

    # http://host[:port][/path prefix] or https://...; no credentials, query or fragment. An https upstream's
    # certificate is verified against the system's trust store (SSL_CERT_FILE / SSL_CERT_DIR honoured).
    url: Annotated[AnyHttpUrl, _pattern(PLAIN_HTTP_URL_PATTERN)] = AnyHttpUrl("http://127.0.0.1:8000")
    # Resolving the host name, connecting and, for https, the TLS handshake, together.
    connect_timeout_seconds: Seconds = 2.0
    # Longest silence between two reads of the upstream's answer: a slow upstream becomes 504 after this.
    read_timeout_seconds: Seconds = 30.0
    # Open connections at most, idle or busy; a request finding all busy waits for one.
    max_connections: int = Field(default=256, ge=1)
    # Requests waiting for a connection at most (all max_connections busy: a slow backend); more are answered
    # 503 at once, counted as pool_full (Envoy's max_pending_requests, same default). Each waiting request
    # holds its client connection and its body read so far (up to buffer_request_body_bytes, ~100 KiB of
    # memory in all): behind a stalled backend, capture batches piled up until the process ran out of memory.
    max_pending_requests: int = Field(default=1024, ge=0)
    # An idle connection closes after this. Keep it below the backend's own idle timeout (gunicorn's gthread
    # worker: --keep-alive), so the proxy is the side that closes; a reuse racing the backend's close is sent
    # again once for GET, HEAD, OPTIONS, TRACE, PUT and DELETE. A backend that closes every connection
    # (gunicorn's sync worker) costs a TCP connect per forward: see the README's benchmarks.
    keepalive_timeout_seconds: Seconds = 15.0
    # "client" keeps the client's Host header (a sidecar in front of a virtual-hosted app); "upstream" sends
    # the upstream URL's host instead.
    host_header: Literal["client", "upstream"] = "client"
    # X-Forwarded-* sent by the client are kept (and appended to) only when the peer is in these networks.
    trusted_proxies: tuple[Network, ...] = ()
    # Request bodies up to this size are read before forwarding (so a retry-free, single write); larger ones
    # are streamed chunk by chunk.
    buffer_request_body_bytes: int = Field(default=65536, ge=0)

    @field_validator("url")
    @classmethod
    def _plain_base(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        # Only scheme, host, port and a path prefix mean anything here: credentials in the URL would never
        # be sent (the client's own Authorization goes through), and a query or fragment would be dropped.
        if value.username is not None or value.password is not None:
            raise ValueError("must not carry credentials (user:password@): they would not be sent")
        if value.query is not None or value.fragment is not None:
            raise ValueError("must not have a query or fragment: request targets are appended to its path")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"not an IP network: {item!r}") from exc
        return value

    @property
    def base(self) -> str:
        """The upstream URL without a trailing slash, so request paths can be appended as they are."""
        return str(self.url).rstrip("/")


class RedisSettings(_Section):
    """The backend's Redis (cache entries, quota set, billing hashes)."""

    # redis://, rediss://, unix://, redis+sentinel://host:port[,...]/service_name[/db] (the master Sentinel
    # names) or redis+cluster://host:port[,...] (a Redis Cluster; any reachable node is enough to find it).
    # Query options the proxy sets itself (socket_timeout, timeout, max_connections, ...) are refused.
    url: RedisUrl = "redis://127.0.0.1:6379/0"
    # Every Redis call is bounded by this; the seed's service used 500 ms.
    timeout_seconds: Seconds = 0.5
    # Per process; a call finding all busy waits for one up to timeout_seconds. On a Cluster: per node, and
    # at most this many calls in flight at once (each holds at most one connection per node).
    max_connections: int = Field(default=16, ge=1)
    # How often the health monitor pings Redis: readiness follows it, and after two failed in a row (one
    # node) requests read nothing from Redis until one answers (what memory cannot answer is forwarded).
    health_check_interval_seconds: Seconds = 1.0
    # With redis+sentinel:// only: the sentinels' own password (their `requirepass`; Bitnami's chart sets
    # it to the master's), when they have one. The URL's credentials are the master's. Set it from a
    # Secret (env REDIS_SENTINEL_PASSWORD); it is never logged.
    sentinel_password: SecretStr | None = None

    @field_validator("sentinel_password")
    @classmethod
    def _sentinel_only(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not info.data.get("url", SENTINEL_SCHEME).startswith(SENTINEL_SCHEME):
            raise ValueError("is for a redis+sentinel:// url only (the URL holds the master's credentials)")
        return value

    @property
    def sentinel_secret(self) -> str | None:
        """The sentinels' own password, if they have one."""
        return None if self.sentinel_password is None else self.sentinel_password.get_secret_value()


class RedisLayout(_Section):
    """Key templates and codecs of the backend's cache entries (contract §2); PostHog's by default."""

    # Django's cache key for `team_key` and `payload_key`: `<key_prefix>:<key_version>:<key>`.
    key_prefix: str = "posthog"
    key_version: int = 1
    # The team record by project token (JSON text, pickled by django-redis).
    team_key: Annotated[str, _pattern(r"\{token\}")] = "team_token:{token}"
    # The flag definitions payload (JSON text) and, with etag_suffix appended, its ETag.
    payload_key: Annotated[str, _pattern(r"\{team_id\}")] = (
        "cache/teams/{team_id}/feature_flags/flags_with_cohorts.json"
    )
    etag_suffix: str = ":etag"
    # The value the backend stores for "this team has no payload" (a miss, forwarded).
    missing_marker: str = "__missing__"
    # The sorted set of quota-limited project tokens (score: until when); raw key, no prefix.
    quota_key: str = "@posthog/quota-limits/feature_flag_requests"
    # The billing hashes (field: the bucket, value: requests), per team and per team and SDK; raw keys.
    billing_team_key: Annotated[str, _pattern(r"\{team_id\}")] = "posthog:local_evaluation_requests:{team_id}"
    billing_sdk_key: Annotated[str, _pattern(r"\{team_id\}")] = (
        "posthog:local_evaluation_requests:sdk:{team_id}:{library}"
    )
    # Ours, not the backend's: the last billing batch a process applied ({batch_id}: the process's own id), so
    # a retried flush never counts twice. On a Cluster one per process and slot group, `<this>:{<hash key>}`.
    billing_dedupe_key: Annotated[str, _pattern(r"\{batch_id\}")] = "edge-proxy:billing-batch:{batch_id}"
    # A billing hash field is the request's unix time divided by this, as an integer.
    billing_bucket_seconds: int = Field(default=120, ge=1)
    # A value that decompresses to more than this is refused (a decompression bomb in Redis).
    max_decoded_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _placeholders(self) -> Self:
        for name, needed in (
            ("team_key", "{token}"),
            ("payload_key", "{team_id}"),
            ("billing_team_key", "{team_id}"),
            ("billing_sdk_key", "{team_id}"),
            ("billing_dedupe_key", "{batch_id}"),
        ):
            if needed not in getattr(self, name):
                raise ValueError(f"{name} must contain {needed}")
        return self


CredentialKind = Literal["personal_api_key", "secret_api_token"]


class AuthSettings(_Section):
    """Auth verdicts learned from the backend (contract §4)."""

    # Credential kinds the proxy may answer for locally; other kinds are always forwarded.
    local_credentials: tuple[CredentialKind, ...] = ("personal_api_key", "secret_api_token")
    # Off: every request the Redis entries cannot decide is forwarded, and nothing is remembered.
    learn_verdicts: bool = True
    # The key of the HMAC that names verdicts in Redis. Unset: verdicts stay in each process's memory.
    # Set it from a Secret (env VERDICT_HMAC_KEY); it is never logged.
    hmac_key: SecretStr | None = None
    # Verdicts are `<key_prefix>:<team_id>:<hex HMAC-SHA256(hmac_key, credential)>`.
    key_prefix: str = "edge-proxy:verdict:v1"
    # How long an "allowed" verdict is used before the backend is asked again (a revoked key's longest use
    # when the backend does not delete the verdict).
    allowed_ttl_seconds: Seconds = 300.0
    # Also the bound on how often one bad credential reaches the backend (once per TTL per replica).
    denied_ttl_seconds: Seconds = 30.0
    # How often verdicts held in memory are re-checked in Redis (one MGET): the revocation delay.
    revalidate_interval_seconds: Seconds = 1.0
    # Verdicts held in memory at most (~1.2 KiB each, measured: 60 MiB at the default), the oldest not read
    # since it was learned dropped first (one read is spared once); one dropped is read from Redis again when
    # next needed (with hmac_key set), else asked of the backend. Every credential the backend refuses is
    # one, so a client spraying random keys fills it: it was a fixed 200,000, ~240 MiB, outside any
    # container's memory budget.
    max_verdicts: int = Field(default=50_000, ge=1)

    @field_validator("hmac_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value


class OffloadSettings(_Section):
    """Gradual offload of the definitions route group: weight, shadow comparisons, runtime control."""

    # Share of eligible requests answered locally (sticky per client); the rest go to the backend.
    weight_percent: float = Field(default=100.0, ge=0, le=100)
    # Compare: forwarded requests are also answered locally in the background and the answers diffed.
    shadow: bool = False
    # Fraction of forwarded requests that get a shadow comparison.
    shadow_sample_rate: float = Field(default=1.0, ge=0, le=1)
    # Shadow comparisons running at once; beyond this they are skipped (and counted), never queued.
    shadow_max_concurrency: int = Field(default=4, ge=1)
    # Upstream bodies larger than this are not compared (counted as "body_not_captured").
    shadow_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    # Mismatches logged per kind (a sample to reproduce from); all are counted.
    shadow_log_samples: int = Field(default=20, ge=0)
    # Redis hash every replica watches: fields weight_percent, kill (1 = forward everything), shadow (0/1).
    # Absent fields fall back to this file. `edge-proxy offload set|kill|status|reset` write and read it;
    # a hash that vanishes (Redis flushed) is written back by the replicas that read it.
    control_key: str = "edge-proxy:offload:definitions"
    # How often replicas re-read it: how long a weight change or the kill switch takes to reach them.
    watch_interval_seconds: Seconds = 0.5


class DefinitionsSettings(_Section):
    """The definitions endpoint: routes, memory cache and freshness."""

    # The route answered locally, and other paths answered the same way (the SDKs' older URL).
    path: Route = "/flags/definitions"
    aliases: tuple[Route, ...] = ("/api/feature_flag/local_evaluation", "/api/feature_flag/local_evaluation/")
    # Bytes of cached payloads held in memory across all teams (LRU beyond that).
    cache_budget_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    # Of those, how many are held decoded, ready to send. Unset: all of them. Set: every payload is also held
    # zstd-compressed (about a tenth of its size for flag JSON), and beyond this budget the least recently
    # served are held compressed only, decompressed in memory for each 200 (~11 us per 50 KB; a 304 never
    # needs the payload). For many teams in little memory: 1,000 x 50 KB fit in ~5 MiB compressed.
    cache_decoded_budget_bytes: int | None = Field(default=None, ge=0)
    # How often the ETags of recently requested teams are re-read (one pipelined MGET), and the team records
    # requested past team_ttl_seconds (another).
    refresh_interval_seconds: Seconds = 0.5
    # A team not requested for this long is dropped from memory and no longer refreshed.
    idle_evict_seconds: Seconds = 600.0
    # While Redis cannot be read, cached payloads are served this long after Redis last confirmed them;
    # after that the definitions requests are forwarded to the backend.
    max_staleness_seconds: Seconds = 30.0
    # Team records are re-read in the background after this long (at the next refresh after a request sees
    # it: all such records in one MGET; until then the one in memory answers).
    team_ttl_seconds: Seconds = 30.0
    # A token without a team record in Redis is forwarded; the negative answer is remembered this long.
    team_miss_ttl_seconds: Seconds = 1.0
    # Flag keys with these prefixes are not billed when every flag of the payload has one.
    unbilled_flag_prefixes: tuple[str, ...] = ("survey-targeting-", "product-tour-targeting-")
    auth: AuthSettings = AuthSettings()
    offload: OffloadSettings = OffloadSettings()

    @field_validator("path", "aliases")
    @classmethod
    def _absolute(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        for item in (value,) if isinstance(value, str) else value:
            if not item.startswith("/"):
                raise ValueError(f"route must start with '/': {item!r}")
        return value


class QuotaSettings(_Section):
    """The quota-limited projects snapshot."""

    # How often the quota set is read (one ZRANGEBYSCORE): how long a newly limited project is still served.
    poll_interval_seconds: Seconds = 2.0
    # While Redis cannot be read the last snapshot is kept this long (from its last successful read), then
    # cleared: the check fails open (contract §3 step 5) rather than limiting anyone on stale data.
    max_staleness_seconds: Seconds = 6.0


class BillingSettings(_Section):
    """Billing counters: tallied in memory, flushed in calls of at most 1,000 increments each."""

    # Two HINCRBY per billed (team, SDK) per flush, whatever the traffic, so Redis pays per team and
    # interval, not per request: 1,000 teams cost 200 commands/s at 10 s and 67/s at 30 s (the reference:
    # 2 per request). Counts go to the bucket of their request time (120 s buckets) and PostHog's aggregation
    # reads them every 30 minutes, skipping the newest bucket, so a later flush only delays them; a bucket
    # begun during an interval waits for the next flush, so each flush writes one bucket per (team, SDK).
    # What a SIGKILL can lose is one interval of one process's counts (SIGTERM flushes): 30 s is one SDK
    # poll; after a bucket boundary, also the new bucket's first seconds held from the previous flush; while
    # flushes fail (Redis down or refusing writes), all that is pending (up to max_pending_batches intervals).
    # Under a day: a batch retried later than that would find its dedupe mark gone.
    flush_interval_seconds: Annotated[float, Field(gt=0, lt=86400, allow_inf_nan=False)] = 30.0
    # Unflushed batches (one per flush interval) kept while Redis is down; beyond this the oldest is dropped
    # and logged. At most a day's worth are kept whatever this says (1000 x 30 s is ~8 h): the mark that makes
    # a retried batch count once lives a day in Redis.
    max_pending_batches: int = Field(default=1000, ge=1)
    # Bound on the final flush at shutdown (all attempts); it runs after the drain, so exit within both.
    final_flush_timeout_seconds: Seconds = 5.0

    @property
    def pending_batches_kept(self) -> int:
        """max_pending_batches, or fewer: no batch may stay pending as long as its dedupe mark lives."""
        within_the_mark = math.ceil(BILLING_DEDUPE_TTL_SECONDS / self.flush_interval_seconds) - 1
        return max(1, min(self.max_pending_batches, within_the_mark))


class RateLimitSettings(_Section):
    """Per-team rate limits (contract §3 step 4)."""

    # Off: no team is ever limited (nothing counted).
    enabled: bool = True
    # The full budget's rate (limits' notation: "600/minute", "10/second"); per team, team_overrides.
    default: RateString = "600/minute"
    # A second budget for requests that carry If-None-Match.
    etag: RateString = "6000/minute"
    # Team id -> rate of its default budget (the If-None-Match budget has no overrides, as in the reference).
    team_overrides: dict[str, RateString] = Field(
        default_factory=dict, json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}}
    )
    # Team ids that bypass both budgets (anything else is ignored, with a warning at startup).
    allowlist: tuple[str, ...] = ()
    # "fast": admit from memory, reconcile with Redis every sync_interval_seconds (no Redis call per
    # request; each replica may over-admit by one lump, below). "exact": a round trip each.
    mode: Literal["fast", "exact"] = "fast"
    # Fast mode: how often admissions are pushed to Redis and the shared counts read back.
    sync_interval_seconds: Seconds = 0.2
    # Fast mode: the most a replica holds admitted and not pushed, as a fraction of the limit (at least 1
    # request; the over-admission bound per other replica): half of it starts a push at once, and a request
    # past all of it (a burst) waits for one. Past half its limit a team is also synced every interval.
    push_fraction: float = Field(default=0.1, gt=0, le=1)
    # A team without a request for this long is no longer re-read at each sync (fast mode): each sync's Redis
    # work is proportional to the teams seen within this time.
    idle_seconds: Seconds = 2.0
    # Prefix of the shared window counters in Redis; both modes use the same keys, so they can be mixed.
    key_prefix: str = "edge-proxy:ratelimit"

    @field_validator("team_overrides")
    @classmethod
    def _team_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for team_id in value:
            if not (team_id.isascii() and team_id.isdigit()):
                raise ValueError(f"keys are team ids (integers), got {team_id!r}")
        return value


class ClientLimitsSettings(_Section):
    """What one client connection may hold: request-head and body deadlines, forwarded body size."""

    # aiohttp closes a connection whose next request head has not fully arrived this long after it opened
    # (or after its previous response). It is aiohttp's only request-head deadline, so it also ends slowloris
    # headers. Above the 60 s idle timeout of common load balancers, so they close idle connections first.
    keepalive_timeout_seconds: Seconds = 75.0
    # Longest silence while reading a forwarded request's body: then 408, and the upstream request is dropped.
    body_read_timeout_seconds: Seconds = 30.0
    # Longest a forwarded request's body may keep the proxy waiting for it in all (the time the upstream takes
    # to accept it is not the client's): then the same 408. A body over upstream.buffer_request_body_bytes is
    # streamed, holding a pooled upstream connection (and a backend worker) while it arrives; a client
    # trickling a byte every few seconds is never silent for body_read_timeout_seconds, and held them for as
    # long as it liked. max_body_bytes (100 MiB) at 1 MB/s fits.
    body_total_timeout_seconds: Seconds = 300.0
    # A client that takes none of an answer's bytes for this long has its connection aborted (nginx's
    # send_timeout): it would hold a descriptor, a place under max_connections and the answer's bytes for as
    # long as it stayed connected without reading. Streamed forwards are bounded per write by
    # upstream.read_timeout_seconds.
    send_timeout_seconds: Seconds = 60.0
    # Forwarded request bodies over this are refused with 413 (before anything goes upstream when the
    # Content-Length says so; a chunked body is cut when it crosses the limit).
    max_body_bytes: int = Field(default=100 * 1024**2, ge=0)
    # Client connections open at once. At the limit a new one takes the place of the oldest idle one (closed),
    # or, when every place is busy, is closed on arrival (both counted; refusals logged). Unset: the open-file
    # limit (raised at start to its hard limit) less what the proxy keeps for its own connections
    # (upstream.max_connections + 2 x redis.max_connections + 64), so clients cannot take the descriptors
    # forwards and Redis need; under about twice that reserve, half the limit (a warning at start says the
    # reserve is short); and no more than the container's memory limit (cgroup) holds beside the payload
    # cache, 16 KiB each (at least 1,024). Set above what the open-file limit allows: refused at start (and
    # by check-config).
    max_connections: int | None = Field(default=None, ge=1)
    # A kept-alive connection is closed after the answer to this many requests (Connection: close), as nginx's
    # keepalive_requests (1,000) does: the client reconnects, and the kernel may hand the new connection to
    # another worker (--workers N spreads connections, not requests). Without it a worker restarted after a
    # crash got none of the clients back from its siblings (a reviewer's: 0 of 150,000 requests in the 10 s
    # after, three workers), nor did a worker that came up after an L7 balancer's few pooled connections
    # were spread. Unset: no limit.
    max_requests_per_connection: int | None = Field(default=1000, ge=1)


class TelemetrySettings(_Section):
    """Metrics (Prometheus scraping, OTLP export) and traces."""

    # Prometheus text on metrics_path, answered in every service mode and never forwarded.
    metrics_enabled: bool = True
    # (Not a route of the backend's: it is never forwarded.)
    metrics_path: Route = "/metrics"
    # On bind's port (the clients'), metrics_path is rendered at most once per this interval and scrapes
    # within it get the same text: a client asking in a loop cannot hold the event loop. 0: every scrape.
    metrics_min_interval_seconds: float = Field(default=1.0, ge=0, le=60, allow_inf_nan=False)
    # With --workers N the workers share bind's port, so a scrape there reaches one of them (the kernel
    # picks). Set this and each worker also answers metrics_path, with its own counts only, on bind's host at
    # this port plus its index (0 to N-1, kept across restarts): scrape those N ports as N targets. Unset:
    # only the shared port. One process or OTLP export do not need it.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # OTLP/HTTP collector base URL (e.g. http://otel-collector:4318): metrics go to /v1/metrics every
    # otlp_export_interval_seconds, sampled spans to /v1/traces. Unset: nothing is pushed. Needs the
    # `otlp` extra (opentelemetry-exporter-otlp-proto-http). No credentials (a collector's go in
    # OTEL_EXPORTER_OTLP_HEADERS), query or fragment.
    otlp_endpoint: Annotated[AnyHttpUrl, _pattern(PLAIN_HTTP_URL_PATTERN)] | None = None
    # Seconds between OTLP metric exports.
    otlp_export_interval_seconds: Seconds = 15.0
    # Share of new traces recorded (a sampled parent traceparent is always followed). 0: no spans at all;
    # the client's traceparent still reaches the upstream unchanged.
    trace_sampling_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    # Label sets per histogram; new ones past the cap share one otel_metric_overflow series. No label ever
    # holds a team id, token or path.
    max_series_per_metric: int = Field(default=1000, ge=10)
    # OpenTelemetry's service.name (metrics' target_info, OTLP resource, spans).
    service_name: str = "edge-proxy"

    @field_validator("metrics_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"route must start with '/': {value!r}")
        return value

    @field_validator("otlp_endpoint")
    @classmethod
    def _exporter_installed(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if value is not None and (value.username is not None or value.password is not None):
            # The config file is a ConfigMap (readable in clear by whoever may read the namespace's
            # ConfigMaps) and the exporter's warnings log the endpoint.
            raise ValueError(
                "must not carry credentials (user:password@): give the collector's in "
                "OTEL_EXPORTER_OTLP_HEADERS (e.g. Authorization=Basic ..., from a Secret)"
            )
        if value is not None and (value.query is not None or value.fragment is not None):
            # /v1/metrics is appended to the URL: "?tenant=a" became "?tenant=a/v1/metrics" (a collector's
            # 404, every export lost), and the exporter's warnings then logged the query (a key in it too).
            raise ValueError("must not have a query or fragment: /v1/metrics and /v1/traces are appended")
        if value is not None and importlib.util.find_spec("opentelemetry.exporter.otlp") is None:
            raise ValueError(
                "needs the otlp extra (pip install 'edge-proxy[otlp]'; "
                "the image has it unless built with --build-arg EXTRAS=)"
            )
        return value


class LoggingSettings(_Section):
    """Log level and format."""

    # DEBUG, INFO, WARNING or ERROR (any case); json: one JSON object per line, text: for a terminal.
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    # One structured line per request on the proxy.access logger (route, status, answered_by, duration,
    # trace id; the path without its query string). Costs ~30 us per request, half the 304 throughput
    # (`python -m bench.telemetry_overhead`): off by default.
    access_log: bool = False

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(_Section):
    """Everything edge-proxy reads, in one frozen object."""

    # host:port ([v6]:port) the clients' port listens on (SO_REUSEPORT).
    bind: str = "0.0.0.0:8080"
    # The health probes (and telemetry.metrics_path) also answered on bind's host at this port: a listener of
    # their own, outside client_limits.max_connections (32 connections of its own, idle ones making room), so
    # a liveness probe is answered while clients hold every connection place (on bind's port it was refused,
    # and the kubelet restarted a busy proxy). It stays open while draining (readiness 503 there) until the
    # process exits. Shared by --workers N (SO_REUSEPORT: one of them answers). Unset: bind's port only.
    health_port: int | None = Field(default=None, ge=1, le=65535)
    # With health_port: the health paths and telemetry.metrics_path answered there only, so clients (the
    # public, in front of a sidecar's app) never see readiness's reasons or the metrics; on bind's port those
    # paths are forwarded like any other (a sidecar's app answers its own). The probes and the scrape then go
    # to health_port, readiness included (there it says 503 while draining).
    health_port_only: bool = False
    # all and definitions: the definitions routes answered locally; flags: forwarded too (health and
    # metrics answered in every mode).
    service_mode: ServiceMode = ServiceMode.ALL
    # Processes on bind's port (a supervisor restarts any that dies); in Kubernetes prefer 1 and more pods.
    workers: int = Field(default=1, ge=1, le=64)
    # With workers > 1: a worker whose event loop has not run for this long (a heartbeat each second) is
    # killed and restarted, as gunicorn's --timeout; one left serving the port would take its share of new
    # connections and answer none. Workers whose supervisor is gone drain and exit within a second.
    # At least 5: a worker writes its first heartbeat once it has imported everything (~1 s, more on a
    # throttled CPU), and one a second after.
    worker_timeout_seconds: float = Field(default=30.0, ge=5, allow_inf_nan=False)
    # Drain budget; with the final billing flush (<= 5 s) it stays inside Kubernetes' 30 s grace period.
    shutdown_timeout_seconds: Seconds = 20.0
    # The Server header of every answer that has none of its own: the proxy's answers (definitions, errors,
    # health, metrics, aiohttp's 400s for malformed requests) and forwarded answers whose upstream sent none;
    # an upstream's own Server header passes unchanged. The reference backend's (gunicorn) by default, so
    # local answers look like forwarded ones, instead of aiohttp's, which names Python's and aiohttp's
    # versions. Printable ASCII, no leading or trailing space.
    server_header: str = Field(
        default="gunicorn",
        min_length=1,
        max_length=256,
        json_schema_extra={"pattern": "^[!-~]([ -~]*[!-~])?$"},
    )
    upstream: UpstreamSettings = UpstreamSettings()
    redis: RedisSettings = RedisSettings()
    layout: RedisLayout = RedisLayout()
    definitions: DefinitionsSettings = DefinitionsSettings()
    quota: QuotaSettings = QuotaSettings()
    billing: BillingSettings = BillingSettings()
    rate_limits: RateLimitSettings = RateLimitSettings()
    client_limits: ClientLimitsSettings = ClientLimitsSettings()
    logging: LoggingSettings = LoggingSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @field_validator("service_mode", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _across_sections(self) -> Self:
        # Every problem at once, one per line (config_loader lists each as its own).
        problems = [
            *self._cluster_marks(),
            *self._distinct_routes(),
            *self._worker_metrics_ports(),
            *self._health_port(),
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _cluster_marks(self) -> list[str]:
        if not self.redis.url.startswith(CLUSTER_SCHEME):
            return []
        problems = []
        # On a Cluster each billing batch marker carries a hash tag naming the hash it guards (billing.py), so
        # that both live in one slot; a brace of the template's own would become the tag instead.
        template = self.layout.billing_dedupe_key.replace("{batch_id}", "")
        if "{" in template or "}" in template:
            problems.append(
                "layout.billing_dedupe_key may hold no brace besides {batch_id} "
                "with a redis+cluster:// redis.url"
            )
        # The same for the rate-limit sync's marks, which take their counter's slot by a hash tag of its key.
        prefix = self.rate_limits.key_prefix
        if "{" in prefix or "}" in prefix:
            problems.append("rate_limits.key_prefix may hold no brace with a redis+cluster:// redis.url")
        return problems

    def _distinct_routes(self) -> list[str]:
        # aiohttp would serve the first route added for a path and never the other.
        routes = [("the health probes", path) for path in HEALTH_PATHS]
        routes.append(("definitions.path", self.definitions.path))
        routes += [("definitions.aliases", alias) for alias in self.definitions.aliases]
        if self.telemetry.metrics_enabled:
            routes.append(("telemetry.metrics_path", self.telemetry.metrics_path))
        problems = []
        seen: dict[str, str] = {}
        for key, path in routes:
            if path in seen:
                problems.append(f"{key}: {path!r} is already the route of {seen[path]}")
            else:
                seen[path] = key
        return problems

    def _worker_metrics_ports(self) -> list[str]:
        first = self.telemetry.worker_metrics_port
        if first is None:
            return []
        if not self.telemetry.metrics_enabled:
            return ["telemetry.worker_metrics_port: needs telemetry.metrics_enabled"]
        last = first + self.workers - 1
        ports = (
            f"port {first} for 1 worker"
            if last == first
            else f"ports {first}-{last} for {self.workers} workers"
        )
        if last > 65535:
            return [f"telemetry.worker_metrics_port: {ports} go past 65535"]
        if first <= self.bind_port <= last:
            return [f"telemetry.worker_metrics_port: {ports} would take bind's port {self.bind_port}"]
        return []

    def _health_port(self) -> list[str]:
        port = self.health_port
        if port is None:
            return ["health_port_only: needs health_port"] if self.health_port_only else []
        if port == self.bind_port:
            return [f"health_port: {port} is bind's port"]
        first = self.telemetry.worker_metrics_port
        if first is not None and first <= port < first + self.workers:
            return [f"health_port: {port} is one of telemetry.worker_metrics_port's"]
        return []

    @field_validator("server_header")
    @classmethod
    def _server_header(cls, value: str) -> str:
        if not all(" " <= c <= "~" for c in value) or value != value.strip():
            raise ValueError("a header value: printable ASCII, no leading or trailing space")
        return value

    @field_validator("bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        # An IPv6 host needs brackets ([::1]:8080): unbracketed, "::1" would parse as host ":" port 1.
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                host = ""
        elif ":" in host or not _HOSTNAME.fullmatch(host):
            host = ""  # a space or a control character: check-config said OK and serve could not listen
        if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
            raise ValueError(f"must be host:port or [ipv6]:port with a port 1-65535, got {value!r}")
        return value

    @property
    def bind_host(self) -> str:
        """Host part of `bind`, brackets removed from an IPv6 literal."""
        return self.bind.rpartition(":")[0].strip("[]")

    @property
    def bind_port(self) -> int:
        """Port part of `bind`."""
        return int(self.bind.rpartition(":")[2])
