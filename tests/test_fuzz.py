"""Fuzzing the parsers we wrote (hypothesis), and a malformed-request corpus against the real server.

Properties, not examples: each parser returns one of its documented outcomes for any input, and agrees with a
plain reference reading where the contract defines one. The corpus test mutates valid requests at random
(seeded, so a failure reproduces) and sends them over raw sockets: 0 crashes, 0 5xx.
"""

from __future__ import annotations

import asyncio
import pickle
import random
import zlib

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.conditional import MAX_LIST_CHARS, bearer, none_match
from proxy.config_loader import ENV_ALIASES, ENV_PREFIX, load_settings
from proxy.contract import DecodeError, RedisContract
from proxy.settings import ConfigError, RedisLayout
from tests.backend_writer import BackendWriter
from tests.conftest import MakeProxy

CONTRACT = RedisContract(RedisLayout(max_decoded_bytes=64 * 1024))
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

header_text = st.text(st.characters(codec="utf-8"), max_size=200)
# What aiohttp hands a handler for arbitrary header bytes: latin-1-ish text with surrogate escapes.
header_bytes_as_str = st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape"))
etags = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters='",'), min_size=1)


# If-None-Match


@FUZZ
@given(header=st.one_of(header_text, header_bytes_as_str), etag=etags)
def test_none_match_never_raises(header: str, etag: str) -> None:
    assert isinstance(none_match(header, etag), bool)


@FUZZ
@given(
    # An ETag that begins with W/ itself, sent bare, loses that prefix to the reference too: no match there.
    etag=etags.filter(lambda etag: not etag.startswith("W/")),
    weak=st.booleans(),
    quoted=st.booleans(),
    pad=st.sampled_from(["", " ", "\t", "  "]),
)
@example(etag="W", weak=True, quoted=False, pad="")
def test_none_match_accepts_every_form_the_reference_accepts(
    etag: str, weak: bool, quoted: bool, pad: str
) -> None:
    value = f'"{etag}"' if quoted else etag
    assert none_match(f"{pad}{'W/' if weak else ''}{value}{pad}", etag)


# Whitespace to latin-1 (0xA0, 0x85) or to UTF-8 (0xC2 0xA0), and bytes that are neither.
PADDING_BYTES = [b" ", b"\t", b"\xa0", b"\x85", b"\xc2\xa0", b"\xc2", b"\xff"]


def _reference_none_match(header: bytes, etag: str) -> bool:
    """The reference's reading of one value (contract §3.6), of the bytes as its server decodes them."""
    value = header.decode("latin-1").strip()
    return (value[2:] if value.startswith("W/") else value).strip('"') == etag


@FUZZ
@given(
    etag=etags,
    lead=st.lists(st.sampled_from(PADDING_BYTES), max_size=3),
    tail=st.lists(st.sampled_from(PADDING_BYTES), max_size=3),
    weak=st.booleans(),
)
@example(etag="e", lead=[], tail=[b"\xa0"], weak=True)
@example(etag="e", lead=[], tail=[b"\xc2\xa0"], weak=True)
def test_none_match_reads_a_single_value_as_the_reference_reads_its_bytes(
    etag: str, lead: list[bytes], tail: list[bytes], weak: bool
) -> None:
    raw = b"".join(lead) + (b"W/" if weak else b"") + f'"{etag}"'.encode() + b"".join(tail)
    # aiohttp hands the handler header bytes as UTF-8 with surrogate escapes.
    assert none_match(raw.decode("utf-8", "surrogateescape"), etag) == _reference_none_match(raw, etag)


@FUZZ
@given(others=st.lists(etags, max_size=5), etag=etags, position=st.integers(0, 5))
def test_none_match_finds_the_etag_anywhere_in_a_list(others: list[str], etag: str, position: int) -> None:
    members = [f'W/"{o}"' for o in others if o != etag]
    members.insert(min(position, len(members)), f'"{etag}"')
    assert none_match(", ".join(members), etag)
    assert not none_match(", ".join(m for m in members if m != f'"{etag}"') or '"-"', etag + "-x")


def test_a_list_longer_than_any_sdk_sends_is_read_as_one_value_as_the_reference_reads_it() -> None:
    """2 MB of commas was split into two million members, ~180 ms of the event loop per request."""
    etag = "0123456789abcdef"
    short = ", ".join(['W/"other"'] * 100 + [f'W/"{etag}"'])
    assert len(short) <= MAX_LIST_CHARS
    assert none_match(short, etag)
    long = "," * MAX_LIST_CHARS + f' W/"{etag}"'
    assert not none_match(long, etag)
    assert none_match(f'W/"{etag}"' + " " * MAX_LIST_CHARS, etag)  # one value, trimmed: a match


# Authorization


@FUZZ
@given(header=st.one_of(header_text, header_bytes_as_str))
@example("Bearer \udcff\udcfe")
def test_bearer_returns_an_encodable_single_token_or_none(header: str) -> None:
    credential = bearer(header)
    if credential is not None:
        assert credential.split() == [credential]
        credential.encode()  # what the HMAC and the secret comparison need
        assert header.split()[0].lower() == "bearer"
        assert header.isascii()  # read as the backend reads it (latin-1 there, UTF-8 here): ASCII only


@pytest.mark.parametrize("space", ["\xa0", "\u2003", "\u3000", "\x85"])
def test_bearer_takes_no_unicode_space_for_the_gap(space: str) -> None:
    """`Bearer<U+00A0>key` is two words to str.split() here, and one ("Bearer\xc2\xa0key", latin-1) to the
    backend, which refuses it: read here, its refusal was learned for the key (found by a reviewer)."""
    assert bearer(f"Bearer{space}phx_key") is None
    assert bearer(f"Bearer phx_key{space}") is None


@FUZZ
@given(
    token=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=80),
    scheme=st.sampled_from(["Bearer", "bearer", "BEARER", "BeArEr"]),
    lead=st.sampled_from(["", " ", "\t"]),
    gap=st.sampled_from([" ", "  ", "\t"]),
)
def test_bearer_reads_well_formed_headers(token: str, scheme: str, lead: str, gap: str) -> None:
    assert bearer(f"{lead}{scheme}{gap}{token}{lead}") == token


# Redis values (contract §2)


def _pickles(value: str | bytes) -> list[bytes]:
    return [pickle.dumps(value, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]


@FUZZ
@given(raw=st.binary(max_size=2000))
def test_decode_text_returns_text_or_refuses(raw: bytes) -> None:
    try:
        text = CONTRACT.decode_text(raw)
    except DecodeError:
        return
    assert text is None or isinstance(text, str)
    if text is not None:
        text.encode()  # served as UTF-8 bytes: must be encodable


@FUZZ
@given(raw=st.binary(max_size=2000), codec=st.sampled_from(["zstd", "zlib"]))
def test_decode_text_of_compressed_garbage_returns_text_or_refuses(raw: bytes, codec: str) -> None:
    data = zstandard.ZstdCompressor().compress(raw) if codec == "zstd" else zlib.compress(raw)
    try:
        text = CONTRACT.decode_text(data)
    except DecodeError:
        return
    assert text is None or isinstance(text, str)


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_a_pickle_string_with_an_invalid_escape_is_refused_not_warned(codec: str) -> None:
    """Found by the fuzzer: genops warns (DeprecationWarning) on the escape; the value is refused."""
    raw = b"P\\\x00\n"
    data = zstandard.ZstdCompressor().compress(raw) if codec == "zstd" else zlib.compress(raw)
    with pytest.raises(DecodeError):
        CONTRACT.decode_text(data)


@FUZZ
@given(text=st.text(max_size=500), codec=st.sampled_from(["none", "zstd", "zlib"]))
def test_decode_text_round_trips_every_pickled_string(text: str, codec: str) -> None:
    for pickled in _pickles(text):
        data = pickled
        if codec == "zstd":
            data = zstandard.ZstdCompressor().compress(pickled)
        elif codec == "zlib":
            data = zlib.compress(pickled)
        try:
            decoded = CONTRACT.decode_text(data)
        except DecodeError:
            # Only a string that cannot be served as UTF-8 may be refused.
            with pytest.raises(UnicodeEncodeError):
                text.encode()
            continue
        assert decoded == (None if text == "__missing__" else text)


@FUZZ
@given(raw=st.binary(max_size=300), flip=st.integers(0, 299), to=st.integers(0, 255))
def test_decode_text_of_a_corrupted_pickle_returns_text_or_refuses(raw: bytes, flip: int, to: int) -> None:
    pickled = bytearray(pickle.dumps(raw.decode("latin-1"), protocol=4))
    pickled[flip % len(pickled)] = to
    try:
        result = CONTRACT.decode_text(bytes(pickled))
    except DecodeError:
        return
    assert result is None or isinstance(result, str)


# Settings from the environment


_NESTED = [
    "REDIS__TIMEOUT_SECONDS",
    "RATE_LIMITS__TEAM_OVERRIDES",
    "RATE_LIMITS__ALLOWLIST",
    "RATE_LIMITS__DEFAULT",
    "DEFINITIONS__ALIASES",
    "DEFINITIONS__MAX_STALENESS_SECONDS",
    "CLIENT_LIMITS__MAX_BODY_BYTES",
    "UPSTREAM__TRUSTED_PROXIES",
    "LAYOUT__TEAM_KEY",
    "NO_SUCH__KEY",
    "REDIS",
]
env_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        ["[", "{", "[1, 2]", "{a: b}", "{'1': '5/minute'}", "-1", "0", "1e400", "nan", "on", "0x10"]
    ),
)


@FUZZ
@given(env=st.dictionaries(st.sampled_from([*ENV_ALIASES, *(ENV_PREFIX + n for n in _NESTED)]), env_values))
def test_any_environment_is_settings_or_a_config_error(env: dict[str, str]) -> None:
    try:
        loaded = load_settings(environ=env)
    except ConfigError as exc:
        message = str(exc)
    else:
        assert loaded.redis.timeout_seconds > 0
        return
    assert message.startswith("invalid configuration")


# Malformed requests against the real server

VALID = [
    b"GET /flags/definitions?token=phc_fuzz&send_cohorts HTTP/1.1\r\nHost: p\r\n"
    b'Authorization: Bearer phs_fuzz_secret\r\nIf-None-Match: W/"abc"\r\n'
    b"User-Agent: posthog-python/7.4.0\r\n\r\n",
    b"POST /capture/?x=1 HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello",
    b"PUT /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /_readiness HTTP/1.1\r\nHost: p\r\n\r\n",
]
INTERESTING = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\0",
    b" ",
    b":",
    b"\xff",
    b"%",
    b"%2F",
    b"..",
    b"/",
    b"?",
    b"&",
    b"=",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"\t",
    b",",
    b'"',
    b"W/",
    b"*",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits: flip, insert, delete, duplicate a slice, or splice in a token."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out) + 1)
        kind = rng.randrange(5)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            out[at:at] = rng.choice(INTERESTING)
        elif kind == 2:
            del out[at : at + rng.randint(1, 8)]
        elif kind == 3:
            out[at:at] = out[max(0, at - 16) : at]
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(out)


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """Bytes until EOF or a pause after the first bytes (aiohttp may linger over an unread body)."""
    data = b""
    while True:
        try:
            # 5 s for the first byte: every deadline involved is 0.3 s, so silence that long is a hang.
            chunk = await asyncio.wait_for(reader.read(65536), 0.5 if data else 5)
        except TimeoutError:
            assert data, "no answer within 5 s"
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.slow
async def test_malformed_request_corpus_gets_no_5xx(
    make_proxy: MakeProxy, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with BackendWriter(redis_url) as writer:
        writer.set_team("phc_fuzz", {"id": 9, "api_token": "phc_fuzz", "secret_api_token": "phs_fuzz_secret"})
        writer.set_definitions(9, [{"id": 1, "key": "beta", "active": True}])
    # A short keep-alive: a mutated request whose framing no longer says where it ends is closed quickly.
    client = await make_proxy(
        rate_limits={"enabled": False},
        client_limits={"keepalive_timeout_seconds": 0.3, "body_read_timeout_seconds": 0.3},
    )
    assert client.port is not None
    rng = random.Random(20240609)  # fixed: a failing case reproduces
    statuses: dict[int, int] = {}
    for i in range(600):
        template = VALID[i % len(VALID)].replace(b"Host: p\r\n", b"Host: p\r\nConnection: close\r\n")
        raw = mutate(rng, template)
        reader, writer_ = await asyncio.open_connection(client.host, client.port)
        try:
            writer_.write(raw)
            answer = await read_answer(reader)
        finally:
            writer_.close()
            await writer_.wait_closed()
        for line in answer.split(b"\r\n"):
            if line.startswith(b"HTTP/1."):
                status = int(line.split(b" ", 2)[1])
                statuses[status] = statuses.get(status, 0) + 1
                assert status < 500, (raw, answer[:300])
    assert (await client.get("/_liveness")).status == 200
    assert "unhandled error" not in caplog.text
    assert sum(statuses.values()) > 300, statuses
