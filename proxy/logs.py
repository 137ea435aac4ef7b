"""The log format (JSON lines in production, text in a terminal), and what keeps the log from flooding."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.settings import LoggingSettings


def where(exc: BaseException) -> str:
    """Where `exc` was raised (file:line in function), for a log line that leaves out the exception's
    message: a message can hold request or Redis data (a key name holds a project token)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def stack(exc: BaseException | None) -> str:
    """`exc`'s traceback as files, lines and code, without the message (see `where`)."""
    return "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__))) if exc else ""


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any `extra=` fields merged in."""

    def format(self, record: logging.LogRecord) -> str:
        """Render `record` as a single JSON line."""
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# How often one kind of request-path warning is written at most (Throttled).
REPEAT_INTERVAL_SECONDS = 10.0


class Throttled:
    """Warnings a request can raise, written at most once per interval for each kind of message.

    When Redis or the upstream fails, every request that needs it fails the same way: thousands of identical
    lines a second would flood the log pipeline and cost CPU exactly when the proxy is already degraded
    (metrics count every failure). The first line of a kind is written; the others within the interval are
    counted, and the next line of that kind says how many there were (text, and `repeated` in JSON lines).
    A kind is the message template, so their number is bounded by the code.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_seconds: float = REPEAT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval_seconds
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}

    def warning(self, msg: str, *args: object) -> None:
        """`logger.warning(msg, *args)`, unless a line of this kind went out less than an interval ago."""
        now = self._clock()
        kind = self._kinds.get(msg)
        if kind is None:
            kind = self._kinds[msg] = _Kind(now - self._interval)
        elif now - kind.written_at < self._interval:
            kind.held += 1
            return
        held, since = kind.held, now - kind.written_at
        kind.written_at, kind.held = now, 0
        if held:
            self._logger.warning(
                f"{msg} (%d more like it in the %.0f s before)", *args, held, since, extra={"repeated": held}
            )
        else:
            self._logger.warning(msg, *args)


@dataclass(slots=True)
class _Kind:
    written_at: float  # when the last line of this kind was written
    held: int = 0  # lines of this kind not written since


class ClientErrorFilter(logging.Filter):
    """aiohttp logs every malformed request with a traceback at ERROR: anyone could flood the logs.

    A client's framing error (4xx) becomes one DEBUG line without the traceback; server errors stay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote a malformed-request record; keep everything else as it is."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        # Here, not at the top: a supervisor of --workers N configures logging without importing aiohttp
        # (this filter only sees aiohttp's records, in the serving processes that import it anyway).
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class OtlpHeaderFilter(logging.Filter):
    """The OpenTelemetry SDK logs each entry of OTEL_EXPORTER_OTLP_HEADERS it cannot parse, whole, at WARNING:
    `Authorization: Bearer <key>` (a colon for the `=`, as in HTTP) put the collector's credential in the log.
    The line stays (the header is dropped, and exports fail), without the entry."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record, its message replaced (it quotes the entry, however the SDK words it)."""
        record.msg = (
            "an entry of OTEL_EXPORTER_OTLP_*HEADERS is not comma-separated name=value pairs, URL-encoded: "
            "it is dropped (not shown: it can hold a credential)"
        )
        record.args = ()
        return True


def configure(settings: LoggingSettings) -> None:
    """Install the handler for the configured level and format on the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # Asked for, the access log is written whatever the level (at WARNING it was silently off).
    logging.getLogger("proxy.access").setLevel(logging.INFO if settings.access_log else logging.NOTSET)
    headers = logging.getLogger("opentelemetry.util.re")
    if not any(isinstance(f, OtlpHeaderFilter) for f in headers.filters):
        headers.addFilter(OtlpHeaderFilter())
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientErrorFilter) for f in server.filters):
        server.addFilter(ClientErrorFilter())
