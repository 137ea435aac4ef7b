"""Header policy of the forwarder: what crosses this hop each way, and the X-Forwarded-* it adds."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from aiohttp import hdrs, web
from yarl import URL

from proxy.conditional import connection_options
from proxy.settings import UpstreamSettings
from proxy.upstream import Response
from proxy.upstream_conn import HOP_BY_HOP

# Rewritten by this hop from what it saw itself, so a client can never inject them verbatim.
FORWARDED_BY_US = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# Other client assertions about where a request came from: believed only from a trusted proxy. Gunicorn
# reads the scheme from X-Forwarded-Ssl and X-Forwarded-Protocol too (secure_scheme_headers); Django the port
# (USE_X_FORWARDED_PORT); Werkzeug's ProxyFix and Spring the prefix.
CLIENT_ORIGIN_CLAIMS = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-forwarded-ssl",
        "x-forwarded-protocol",
        "x-forwarded-port",
        "x-forwarded-prefix",
    }
)
# Host follows the configured policy; Expect was already answered by aiohttp's 100-continue handler, and a
# second handshake with a backend that never sends 100 would stall the upload. Content-Length is written
# from the body actually sent (as Transfer-Encoding, hop by hop): framing never comes from the client's
# header list, which its Connection header can shorten ("Connection: content-length" would otherwise send a
# body with no framing, read upstream as the next request on a pooled connection: request smuggling).
REQUEST_SET_BY_US = frozenset({"host", "expect", "content-length"})

DROP_FROM_TRUSTED = HOP_BY_HOP | FORWARDED_BY_US | REQUEST_SET_BY_US
DROP_FROM_UNTRUSTED = DROP_FROM_TRUSTED | CLIENT_ORIGIN_CLAIMS
# Header names HeaderPolicy remembers the fate of, per drop set (names are client-chosen: bounded).
KEPT_NAMES_CAP = 1024
KEPT_NAME_LENGTH = 64


class HeaderPolicy:
    """The request headers sent upstream: the Host policy, and whom X-Forwarded-* are believed from."""

    def __init__(self, settings: UpstreamSettings) -> None:
        base = URL(settings.base, encoded=True)
        # What the "upstream" Host policy sends: the URL's host, and its port unless the scheme's default.
        self._upstream_host = _host_header(base)
        self._keep_client_host = settings.host_header == "client"
        self._is_trusted = trust_checker(ip_network(n, strict=False) for n in settings.trusted_proxies)
        self._trusting = bool(settings.trusted_proxies)  # else no peer is, and the check is not called
        # Whether a client's header goes on, by its name as received, for the two drop sets (a Connection
        # header's names make a set of their own, not remembered): the name's lower() and set lookup made
        # once per name rather than per request. Bounded: past the cap, and names longer than
        # KEPT_NAME_LENGTH, are checked every time.
        self._kept: dict[frozenset[str], dict[str, bool]] = {DROP_FROM_TRUSTED: {}, DROP_FROM_UNTRUSTED: {}}

    def request(self, request: web.Request) -> list[tuple[str, str]]:
        """The headers to send upstream: the client's end-to-end ones and this hop's X-Forwarded-*."""
        incoming = request.headers
        # The connection's, read once per connection by aiohttp (get_extra_info is a syscall per call on
        # uvloop: 1.7 % of forwarding CPU when read per request).
        peername = request.protocol.peername
        # A TCP peer is (host, port[, flow, scope]); a Unix socket has no address to vouch for.
        peer = peername[0] if isinstance(peername, tuple) and peername else None
        trusted = peer is not None and self._trusting and self._is_trusted(peer)

        drop = DROP_FROM_TRUSTED if trusted else DROP_FROM_UNTRUSTED
        # The Host header, never request.host: for an absolute-form target aiohttp reports the target's host.
        host = incoming.get(hdrs.HOST)
        headers = [("Host", host if host is not None and self._keep_client_host else self._upstream_host)]
        # A name with "_" never goes on (nginx's default, underscores_in_headers off): a WSGI server reads
        # "X_Forwarded_For" as X-Forwarded-For, and gunicorn takes SCRIPT_NAME from a proxy it trusts (the
        # loopback, so this one): "SCRIPT_NAME: /prefix" took a request outside the upstream's base path.
        if hdrs.CONNECTION in incoming:
            drop = drop | connection_options(incoming)
            headers += [(k, v) for k, v in incoming.items() if k.lower() not in drop and "_" not in k]
        else:
            kept = self._kept[drop]
            for k, v in incoming.items():
                keep = kept.get(k)
                if keep is None:
                    keep = k.lower() not in drop and "_" not in k
                    if len(kept) < KEPT_NAMES_CAP and len(k) <= KEPT_NAME_LENGTH:
                        kept[k] = keep
                if keep:
                    headers.append((k, v))

        if peer is not None:
            if trusted:
                headers.append(
                    (hdrs.X_FORWARDED_FOR, ", ".join([*incoming.getall(hdrs.X_FORWARDED_FOR, ()), peer]))
                )
            else:
                headers.append((hdrs.X_FORWARDED_FOR, peer))
        # Proto and Host describe the client-facing hop: a trusted proxy's value is the original one, kept.
        proto = incoming.get(hdrs.X_FORWARDED_PROTO) if trusted else None
        headers.append((hdrs.X_FORWARDED_PROTO, proto or request.scheme))
        forwarded_host = (incoming.get(hdrs.X_FORWARDED_HOST) if trusted else None) or host
        if forwarded_host:
            headers.append((hdrs.X_FORWARDED_HOST, forwarded_host))
        return headers


def end_to_end(upstream: Response) -> list[tuple[str, str]]:
    """The upstream answer's headers a client may see: hop-by-hop ones, and what its Connection names, out.

    A list, which the response the forwarder builds copies into its own CIMultiDict; the upstream's own list
    when nothing is to go (read only: the parse noted whether any header is hop by hop).
    """
    if not upstream.hop_by_hop:
        return upstream.headers
    tokens, hop_at = upstream.connection_tokens, upstream.hop_at
    if hop_at is not None and tokens <= HOP_BY_HOP:
        # Connection names only fields dropped anyway (gunicorn's "Connection: keep-alive"): the headers the
        # parse classified as hop by hop (their names in HOP_BY_HOP) are the ones to go, cut out by position
        # rather than by a set union, a lower() and a lookup per header (callgrind, a 10-header gunicorn
        # answer: 3,913 instructions against 16,335; tests/test_upstream.py checks both ways).
        if len(hop_at) == 1:
            at = hop_at[0]
            return upstream.headers[:at] + upstream.headers[at + 1 :]
        return [header for i, header in enumerate(upstream.headers) if i not in hop_at]
    drop = HOP_BY_HOP | tokens if tokens else HOP_BY_HOP
    return [(k, v) for k, v in upstream.headers if k.lower() not in drop]


def _host_header(base: URL) -> str:
    """The Host an HTTP client derives from `base`: host (IPv6 in brackets), and a port unless default."""
    host = base.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if base.is_default_port() else f"{host}:{base.port}"


def trust_checker(networks: Iterable[IPv4Network | IPv6Network]) -> Callable[[str], bool]:
    """A check of whether a peer address is in one of `networks` (a trusted proxy: its X-Forwarded-* kept)."""
    trusted_networks = tuple(networks)
    if not trusted_networks:
        return lambda _peer: False

    # Peers repeat (one per keep-alive connection, a handful of proxies): parse each address once.
    @lru_cache(maxsize=4096)
    def is_trusted(peer: str) -> bool:
        try:
            address = ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in trusted_networks)

    return is_trusted
