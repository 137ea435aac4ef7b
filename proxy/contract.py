"""The backend's Redis contract in one place: key templates (from config) and value codecs (contract §2)."""

from __future__ import annotations

import io
import pickle  # its HIGHEST_PROTOCOL only: nothing here unpickles (pickletools reads opcodes)
import pickletools
import re
import struct
import warnings
import zlib
from typing import cast

import zstandard

from proxy.settings import RedisLayout

# RFC 8878 §3.1.1: every zstd frame starts with this magic number.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A pickled str or bytes is these opcodes and nothing else: no opcode here can name a global, call, or
# build an object, so a value that passes cannot execute anything when a Python backend reads it back.
_TEXT_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"})
_BYTES_OPS = frozenset({"SHORT_BINBYTES", "BINBYTES", "BINBYTES8"})
_MEMO_OPS = frozenset({"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"})
# pickle writes str with "surrogatepass", so a lone surrogate survives unpickling but not UTF-8 encoding.
_SURROGATE = re.compile("[\ud800-\udfff]")
# django-redis stores ints as their digits, unpickled and uncompressed.
_INT_TEXT = re.compile(rb"-?[0-9]+")


class DecodeError(Exception):
    """A value in Redis is not something the backend writes (or is hostile); treat it as a miss."""


class RedisContract:
    """Keys of one backend profile; the PostHog layout is the default RedisLayout."""

    def __init__(self, layout: RedisLayout) -> None:
        self.layout = layout
        # django-redis makes keys as "<prefix>:<version>:<key>".
        self._django = f"{layout.key_prefix}:{layout.key_version}:"

    def team_key(self, token: str) -> str:
        """Team record by project token."""
        return self._django + self.layout.team_key.format(token=token)

    def payload_key(self, team_id: int) -> str:
        """Definitions payload of one team."""
        return self._django + self.layout.payload_key.format(team_id=team_id)

    def etag_key(self, team_id: int) -> str:
        """ETag of the payload, written with it."""
        return self.payload_key(team_id) + self.layout.etag_suffix

    @property
    def quota_key(self) -> str:
        """Sorted set of quota-limited project tokens (no django prefix)."""
        return self.layout.quota_key

    def billing_keys(self, team_id: int, library: str) -> tuple[str, str]:
        """The two billing hashes (raw Redis, no django prefix): per team and per team and SDK."""
        return (
            self.layout.billing_team_key.format(team_id=team_id),
            self.layout.billing_sdk_key.format(team_id=team_id, library=library),
        )

    def decode_text(self, raw: bytes | None, *, marked: bool = True) -> str | None:
        """The text django-redis stored; None if absent or (unless not `marked`) the "missing" marker;
        DecodeError if it is no text the backend could read."""
        if raw is None:
            return None
        cap = self.layout.max_decoded_bytes
        if raw.startswith(_ZSTD_MAGIC):
            text = _unpickle_text(_unzstd(raw, cap))
        elif _is_zlib(raw):
            text = _unpickle_text(_unzlib(raw, cap))
        elif len(raw) > cap:
            raise DecodeError(f"value of {len(raw)} bytes is over the {cap}-byte cap")
        elif raw[:1] in (b"{", b"["):
            # Plain JSON text, as a writer that bypasses django-redis would store it.
            text = _utf8(raw)
        elif _INT_TEXT.fullmatch(raw):
            # django-redis stores an int unpickled and reads it back as an int: the backend's readers take
            # a payload, ETag or team record that is no string for none at all (found by a reviewer).
            raise DecodeError("an integer stored unpickled, not text")
        else:
            text = _unpickle_text(raw)
        return None if marked and text == self.layout.missing_marker else text


def _is_zlib(raw: bytes) -> bool:
    # RFC 1950: CMF 0x78 is deflate with a 32 KiB window (what zlib.compress writes); the check bits
    # make CMF*256+FLG a multiple of 31.
    return len(raw) >= 2 and raw[0] == 0x78 and (raw[0] << 8 | raw[1]) % 31 == 0


def _unzstd(raw: bytes, cap: int) -> bytes:
    try:
        declared = zstandard.frame_content_size(raw)
        # The one-shot decoder trusts a declared size (and ignores max_output_size), so a declared size
        # over the cap is refused before anything is allocated.
        if declared > cap:
            raise DecodeError(f"zstd frame declares {declared} bytes, over the {cap}-byte cap")
        # Without a declared size, max_output_size bounds the output: a bomb fails at the cap.
        return zstandard.ZstdDecompressor().decompress(raw, max_output_size=cap, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"not a readable zstd frame within {cap} bytes") from exc


def _unzlib(raw: bytes, cap: int) -> bytes:
    stream = zlib.decompressobj()
    try:
        # max_length stops inflating one byte past the cap, however much the input would expand to.
        out = stream.decompress(raw, cap + 1)
    except zlib.error as exc:
        raise DecodeError("not a readable zlib stream") from exc
    if len(out) > cap:
        raise DecodeError(f"zlib stream inflates past the {cap}-byte cap")
    if not stream.eof or stream.unused_data:
        raise DecodeError("truncated zlib stream, or data after it")
    return out


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("not UTF-8 text") from exc


def _unpickle_text(data: bytes) -> str:
    """The str (or UTF-8 bytes) of a pickle made of one string opcode; DecodeError for any other pickle."""
    found: str | bytes | None = None
    try:
        # A string argument with an invalid escape (protocol 0) makes genops warn; garbage, refused here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            # genops only parses opcodes and their arguments; it never imports or calls anything.
            for opcode, arg, pos in pickletools.genops(io.BytesIO(data)):
                name = opcode.name
                if name in _TEXT_OPS or name in _BYTES_OPS:
                    if found is not None:
                        raise DecodeError("pickle holds more than one string")
                    found = cast("str | bytes", arg)
                elif name == "STOP" and found is not None and pos == len(data) - 1:
                    return _utf8(found) if isinstance(found, bytes) else _checked(found)
                elif (
                    # pickle.loads refuses a protocol it does not know, and a frame longer than what follows.
                    (name == "PROTO" and pos == 0 and cast(int, arg) <= pickle.HIGHEST_PROTOCOL)
                    or (name == "FRAME" and cast(int, pos) + 9 + cast(int, arg) <= len(data))
                    or (name in _MEMO_OPS and found is not None)
                ):
                    continue
                else:
                    raise DecodeError(f"pickle opcode {name} at byte {pos} is not allowed here")
    except (ValueError, struct.error, DeprecationWarning) as exc:
        # Truncated or garbled: genops reports both as ValueError.
        raise DecodeError("not a pickle") from exc
    # genops returns only after STOP, which returned or raised above.
    raise DecodeError("not a pickle")


def _checked(text: str) -> str:
    # isascii() is O(1) on CPython's compact strings, so the common case skips the scan.
    if not text.isascii() and _SURROGATE.search(text):
        raise DecodeError("pickled str holds a lone surrogate")
    return text


# PostHog's billing names (rust/feature-flags: utils/user_agent.rs parses `posthog-<name>/<version>`,
# handler/types.rs keeps only the names of its Library enum; "posthog-rs" is parsed but billed as "other").
_BILLED_LIBRARIES = frozenset(
    {
        "posthog-js",
        "posthog-node",
        "posthog-python",
        "posthog-php",
        "posthog-ruby",
        "posthog-go",
        "posthog-java",
        "posthog-dotnet",
        "posthog-elixir",
        "posthog-android",
        "posthog-ios",
        "posthog-react-native",
        "posthog-flutter",
        "posthog-server",
    }
)
# A browser's User-Agent is billed as posthog-js (UserAgentInfo::is_browser_user_agent).
_BROWSER_MARKERS = ("Mozilla/", "Chrome/", "Safari/", "Firefox/", "Edge/")
_LIBRARY_CACHE: dict[str, str] = {}
_LIBRARY_CACHE_SIZE = 256


def library_from_user_agent(user_agent: str | None) -> str:
    """The SDK library name billed for a User-Agent (`posthog-python/7.4.0` -> `posthog-python`)."""
    if not user_agent:
        return "other"
    library = _LIBRARY_CACHE.get(user_agent)
    if library is None:
        library = _classify(user_agent)
        # Called per billed request: remember a few User-Agents, and forget them all when a client
        # that varies its User-Agent would grow the dict without bound.
        if len(_LIBRARY_CACHE) >= _LIBRARY_CACHE_SIZE:
            _LIBRARY_CACHE.clear()
        _LIBRARY_CACHE[user_agent] = library
    return library


def _classify(user_agent: str) -> str:
    if user_agent.startswith("posthog-"):
        # `posthog-<name>/<version> [anything]`: a known name with a non-empty version, else "other"
        # (never a browser, so a custom `posthog-x/1 Chrome/...` is not billed as posthog-js).
        name, slash, version = user_agent.partition("/")
        return name if slash and version and name in _BILLED_LIBRARIES else "other"
    if any(marker in user_agent for marker in _BROWSER_MARKERS):
        return "posthog-js"
    return "other"
