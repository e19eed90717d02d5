from __future__ import annotations

import httpx



async def test_metrics_endpoint_exposes_what_an_operator_watches(api) -> None:  # type: ignore[no-untyped-def]
    async with httpx.AsyncClient(base_url=api.url) as http:
        r = await http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in [
        "spacebell_x_api_calls_total",
        "spacebell_x_rate_limit_remaining",
        "spacebell_discovery_cycle_seconds",
        "spacebell_discovery_max_staleness_seconds",
        "spacebell_x_estimated_daily_spend_usd",
        "spacebell_outbox_depth",
        "spacebell_dispatch_results_total",
        "spacebell_dispatch_lateness_seconds",
        "spacebell_webhook_endpoint_failures_total",
    ]:
        assert f"# TYPE {name.removesuffix('_total')}" in r.text, name
