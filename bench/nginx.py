"""A second ceiling: nginx (one worker) serving the same bytes and headers from files, no logic."""

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


def write_config(workdir: Path, www: Path, port: int, teams: Sequence[Team]) -> Path:
    """nginx.conf serving www/t/<token>.json at the definitions path; 304 when If-None-Match is the ETag."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    etags = workdir / "etags.map"
    etags.write_text("".join(f"{team.token} 'W/\"{team.etag}\"';\n" for team in teams))
    temp_paths = "\n".join(
        f"    {kind}_temp_path {workdir / 'tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config = workdir / "nginx.conf"
    config.write_text(
        f"""\
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
    types {{ }}
    default_type application/json;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    etag off;
    keepalive_requests 100000000;
    keepalive_timeout 120s;
    open_file_cache max=4096 inactive=300s;
    open_file_cache_valid 300s;
{temp_paths}
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


def command(nginx: str, workdir: Path, config: Path) -> list[str]:
    """The foreground nginx command for `config`."""
    return [nginx, "-p", str(workdir), "-c", str(config), "-e", str(workdir / "error.log")]
