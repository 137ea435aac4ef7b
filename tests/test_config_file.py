"""The documented config file is the settings model: every key, every default, nothing stale."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from proxy.config_loader import load_settings
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "edge-proxy.yaml"


def test_config_file_holds_exactly_the_defaults() -> None:
    assert load_settings(CONFIG, environ={}) == Settings()


def test_config_file_is_regenerated_from_the_settings_module() -> None:
    # PYTHONPATH: the script imports `proxy` from this checkout, not where the venv's editable install points.
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config.py"), "--check"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, "config/edge-proxy.yaml is stale: run scripts/gen_config.py"
