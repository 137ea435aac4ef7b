"""nginx (one worker) as the reference in two places: a second ceiling serving the same bytes and headers
from files, no logic; and a forwarder in the proxy's place in front of Django (what a fast proxy costs
there)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from bench.dataset import DEFINITIONS_PATH, Team


def binary() -> str | None:
    """The nginx executable, if installed."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def _head(workdir: Path) -> str:
    """The main context and the start of the http block, shared by both configurations."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {workdir / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
{temp_paths}
"""


def write_config(workdir: Path, www: Path, port: int, teams: Sequence[Team]) -> Path:
    """nginx.conf serving www/t/<token>.json at the definitions path; 304 when If-None-Match is the ETag."""
    head = _head(workdir)
    etags = workdir / "etags.map"
    etags.write_text("".join(f"{team.token} 'W/\"{team.etag}\"';\n" for team in teams))
    config = workdir / "nginx.conf"
    config.write_text(
        f"""\
{head}    types {{ }}
    default_type application/json;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    etag off;
    open_file_cache max=4096 inactive=300s;
    open_file_cache_valid 300s;
    map_hash_bucket_size 128;
    map $arg_token $bench_etag {{
        default "";
        include {etags};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {www};
        location = {DEFINITIONS_PATH} {{
            add_header ETag $bench_etag always;
            add_header Cache-Control "private, must-revalidate" always;
            if ($http_if_none_match = $bench_etag) {{
                return 304;
            }}
            try_files /t/$arg_token.json =404;
        }}
        location = /_liveness {{
            return 200 "ok";
        }}
    }}
}}
"""
    )
    return config


def write_forward_config(workdir: Path, port: int, upstream_port: int) -> Path:
    """nginx.conf forwarding every request to the upstream on loopback as the proxy does: HTTP/1.1, up to
    256 idle connections kept (the proxy's `upstream.max_connections`) for 15 s (its keep-alive timeout),
    the client's Host, and the same X-Forwarded-For/-Proto/-Host, so the backend does the same work behind
    either."""
    head = _head(workdir)
    config = workdir / "nginx.conf"
    config.write_text(
        f"""\
{head}    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
        keepalive_timeout 15s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
        location = /_liveness {{
            return 200 "ok";
        }}
    }}
}}
"""
    )
    return config


def command(nginx: str, workdir: Path, config: Path) -> list[str]:
    """The foreground nginx command for `config`."""
    return [nginx, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]
