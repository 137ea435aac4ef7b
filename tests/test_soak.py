"""The soak in one minute (`make soak` runs it for 30): no memory, task or file-descriptor growth."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import soak

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
async def test_one_minute_soak_holds_its_bounds(tmp_path: Path) -> None:
    report = await soak.run(minutes=1.0, rate=150.0, teams=300, warmup_fraction=0.4, workdir=tmp_path)

    assert report.problems == [], report
    assert report.requests > 5000
    assert report.rss_growth_percent < soak.MAX_RSS_GROWTH_PERCENT
    assert report.tasks_idle_end <= report.tasks_idle_after_warmup + soak.COUNT_SLACK
    assert report.fds_idle_end <= report.fds_idle_after_warmup + soak.COUNT_SLACK
    assert not any(status >= 500 for status in report.statuses)
