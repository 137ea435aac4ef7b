"""The benchmark's arithmetic (bench/report.py): the ratios the README quotes come from here."""

from __future__ import annotations

import pytest

from bench.report import (
    CEILING,
    DIRECT,
    DJANGO,
    NGINX_VIA,
    PROXY,
    SIZED_VIA,
    VIA,
    Row,
    Sample,
    baseline_of,
    ceiling_ratio,
    checks,
    ratio,
)


def sample(rps: float, cpu_us: float = 50.0, round_: int | None = None) -> Sample:
    return Sample(
        rps=rps,
        p50_ms=1.0,
        p95_ms=2.0,
        p99_ms=3.0,
        requests=int(rps * 3),
        cpu_us_per_req=cpu_us,
        backend_cpu_us_per_req=None,
        peak_rss_mib=60.0,
        redis_per_req=0.0,
        redis_by_command={},
        bad_responses=0,
        statuses={},
        backend_hits=None,
        server_core_busy=1.0,
        load_core_busy=0.5,
        round=round_,
    )


def row(server: str, samples: list[Sample], scenario: str = "304") -> Row:
    return Row("50 KB", 1, scenario, server, samples=samples)


def test_a_ratio_is_the_median_of_same_round_ratios_not_a_ratio_of_medians() -> None:
    # Same-round ratios 0.9, 0.5 and 1.2: their median is 0.9. The medians (60 and 80) come from different
    # rounds and would say 0.75.
    proxy = row(PROXY, [sample(90, round_=0), sample(40, round_=1), sample(60, round_=2)])
    ceiling = row(CEILING, [sample(100, round_=0), sample(80, round_=1), sample(50, round_=2)])
    assert ceiling_ratio([proxy, ceiling], proxy) == pytest.approx(0.9)
    assert ratio([proxy, ceiling], proxy, CEILING) == pytest.approx(0.9)


def test_only_rounds_both_servers_ran_are_paired() -> None:
    proxy = row(PROXY, [sample(90, round_=0), sample(45, round_=1), sample(1000, round_=7)])
    ceiling = row(CEILING, [sample(100, round_=0), sample(50, round_=1), sample(5, round_=3)])
    assert ratio([proxy, ceiling], proxy, CEILING) == pytest.approx(0.9)


def test_cpu_ratios_are_inverted_so_that_higher_is_better() -> None:
    proxy = row(PROXY, [sample(10, cpu_us=40, round_=0), sample(10, cpu_us=60, round_=1)])
    django = row(DJANGO, [sample(1, cpu_us=2000, round_=0), sample(1, cpu_us=3000, round_=1)])
    assert ratio([proxy, django], proxy, DJANGO, "cpu_us_per_req") == pytest.approx(50.0)


def test_samples_saved_without_rounds_fall_back_to_the_ratio_of_medians() -> None:
    proxy = row(PROXY, [sample(80), sample(40), sample(60)])
    ceiling = row(CEILING, [sample(100), sample(50), sample(70)])
    assert ratio([proxy, ceiling], proxy, CEILING) == pytest.approx(60 / 70)


def test_no_ratio_without_the_other_server_or_for_the_other_scenarios() -> None:
    proxy = row(PROXY, [sample(80, round_=0)])
    assert ratio([proxy], proxy, CEILING) is None
    assert ratio([proxy], proxy, None) is None
    forward = row(PROXY, [sample(80, round_=0)], scenario="forward")
    assert ceiling_ratio([forward, row(CEILING, [sample(100, round_=0)], "forward")], forward) is None


def test_forwarding_rows_are_set_against_django_direct_and_nginx_in_the_proxys_place() -> None:
    # Rounds: proxy 1600/1700, nginx 1700/1800, direct 2000/1800 (same-round ratios: proxy/direct 0.8 and
    # 0.944, nginx/direct 0.85 and 1.0, proxy/nginx 0.941 and 0.944).
    via = row(
        VIA, [sample(1600, cpu_us=250, round_=0), sample(1700, cpu_us=230, round_=1)], "forward-keepalive"
    )
    via.samples[0].backend_cpu_us_per_req = via.samples[1].backend_cpu_us_per_req = 500.0
    nginx = row(
        NGINX_VIA, [sample(1700, cpu_us=80, round_=0), sample(1800, cpu_us=84, round_=1)], "forward-keepalive"
    )
    direct = row(DIRECT, [sample(2000, round_=0), sample(1800, round_=1)], "forward-keepalive")
    rows = [via, nginx, direct]

    assert baseline_of(nginx) == DIRECT
    assert ratio(rows, nginx, baseline_of(nginx)) == pytest.approx((0.85 + 1.0) / 2)
    assert ceiling_ratio(rows, via) == pytest.approx((1600 / 1700 + 1700 / 1800) / 2)
    assert ceiling_ratio(rows, nginx) is None

    found = {c["check"]: c for c in checks(rows, {})}
    assert found["forward-keepalive: proxy/direct req/s"]["value"] == pytest.approx((0.8 + 1700 / 1800) / 2)
    assert found["forward-keepalive: proxy/direct req/s"]["ok"] is False
    assert found["forward-keepalive: nginx in the proxy's place, nginx/direct req/s"][
        "value"
    ] == pytest.approx(0.925)
    assert found["forward-keepalive: proxy/nginx req/s, each in front of the same Django"]["ok"] is None
    assert found["forward-keepalive: nginx CPU us per forwarded request"]["value"] == pytest.approx(82)


def test_without_an_nginx_row_the_forwarding_checks_are_the_proxys_alone() -> None:
    via = row(VIA, [sample(1700, round_=0)], "forward")
    direct = row(DIRECT, [sample(1600, round_=0)], "forward")
    found = [c["check"] for c in checks([via, direct], {})]
    assert "forward: proxy/direct req/s" in found
    assert not [name for name in found if "nginx" in name]
    assert ceiling_ratio([via, direct], via) is None


def test_the_sized_pool_row_is_reported_beside_the_default_whose_verdict_stands() -> None:
    scenario = "forward-keepalive"
    via = row(VIA, [sample(1600, round_=0), sample(1700, round_=1)], scenario)
    sized = row(SIZED_VIA, [sample(1900, round_=0), sample(1800, round_=1)], scenario)
    nginx = row(NGINX_VIA, [sample(1700, round_=0), sample(1800, round_=1)], scenario)
    direct = row(DIRECT, [sample(2000, cpu_us=450, round_=0), sample(2000, cpu_us=470, round_=1)], scenario)
    for forwarded, django_cpu in ((via, 530.0), (sized, 480.0)):
        for s in forwarded.samples:
            s.backend_cpu_us_per_req = django_cpu
    rows = [via, sized, nginx, direct]

    assert baseline_of(sized) == DIRECT
    assert ceiling_ratio(rows, sized) == pytest.approx((1900 / 1700 + 1800 / 1800) / 2)
    found = {c["check"]: c for c in checks(rows, {})}
    assert found[f"{scenario}: proxy/direct req/s"]["ok"] is False  # the default pool's verdict
    sized_ratio = found[
        f"{scenario}: proxy with upstream.max_connections = Django's threads, proxy/direct req/s"
    ]
    assert sized_ratio["value"] == pytest.approx((0.95 + 0.9) / 2)
    assert sized_ratio["ok"] is None
    assert found[f"{scenario}: Django CPU us per request, behind the default pool"]["value"] == 530
    assert found[f"{scenario}: Django CPU us per request, behind the sized pool"]["value"] == 480
    assert found[f"{scenario}: Django CPU us per request, direct"]["value"] == 460
