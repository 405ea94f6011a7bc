"""A sidecar with 10,000 devices: GET /v1/devices pages (the contract the status page reads) and /metrics
stays bounded (per-device series capped, aggregates over every device)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway.codes import code_of
from gateway.errors import make_error
from gateway.sidecar.config import parse_config
from tests.sidecar.fakes import connection_string

N = 10_000
_ARGUMENT = code_of("ArgumentInvalid")


def _fleet(tmp_path: Path, n: int, **extra: Any) -> Any:
    lines = [f'{{"id": "dev-{i:05}", "connection_string": "{connection_string(f"dev-{i:05}")}"}}' for i in range(n)]
    (tmp_path / "devices.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # unsorted on purpose
    data = {"upstream": {"kind": "iothub", "host": "127.0.0.1", "tls": False},
            "outbox": {"path": str(tmp_path / "outbox.sqlite3")}, "delivery": {"shutdown_deadline": 0.5},
            "devices": {"file": "devices.jsonl", "protocol": "mqtt"}, **extra}
    return parse_config(data, source="test", base=tmp_path, env={})


async def test_devices_are_paged_by_id_with_a_cursor_and_a_total(tmp_path: Path, start_sidecar: Any) -> None:
    run = await start_sidecar(_fleet(tmp_path, N))
    await run.wait_for(lambda: run.sidecar.metrics.states.per_state.get(("mqtt", "connected")) == N, 60)
    first = await (await run.client.get("/v1/devices")).json()
    assert first["total"] == N and len(first["devices"]) == 1000 and first["next"] == "dev-00999"
    assert [d["id"] for d in first["devices"]] == [f"dev-{i:05}" for i in range(1000)]
    assert {d["state"] for d in first["devices"]} == {"connected"}
    seen: list[str] = []
    after: str | None = None
    while True:
        query = f"?limit=777&after={after}" if after else "?limit=777"
        page = await (await run.client.get(f"/v1/devices{query}")).json()
        assert page["total"] == N and len(page["devices"]) <= 777
        seen += [d["id"] for d in page["devices"]]
        after = page["next"]
        if after is None:
            break
        assert after == seen[-1]
    assert seen == sorted(f"dev-{i:05}" for i in range(N))
    # any string is a cursor: the page starts after it in id order, and the last page says next null
    page = await (await run.client.get("/v1/devices?limit=3&after=dev-00004x")).json()
    assert [d["id"] for d in page["devices"]] == ["dev-00005", "dev-00006", "dev-00007"]
    assert (await (await run.client.get("/v1/devices?after=dev-09998")).json())["next"] is None
    assert (await (await run.client.get("/v1/devices?after=zzz")).json()) == {"devices": [], "next": None,
                                                                              "total": N}
    for bad in ("limit=0", "limit=1001", "limit=-1", "limit=abc", "limit=", "after="):
        resp = await run.client.get(f"/v1/devices?{bad}")
        assert resp.status == 400 and (await resp.json())["errorCode"] == _ARGUMENT, bad


async def test_metrics_stay_bounded_with_ten_thousand_devices(tmp_path: Path, start_sidecar: Any) -> None:
    run = await start_sidecar(_fleet(tmp_path, N, metrics={"per_device_max": 50}))
    await run.wait_for(lambda: run.sidecar.metrics.states.per_state.get(("mqtt", "connected")) == N, 60)
    # one device in trouble: it gets its series before the healthy ones whatever its id
    trouble = run.upstream.transports["dev-09876"]
    trouble.connect_errors = [make_error(code_of("IotHubUnauthorizedAccess"), transport="mqtt")] * 3
    trouble.drop(make_error(code_of("ServerBusy"), transport="mqtt"))
    await run.wait_for(lambda: run.sidecar.pipelines["dev-09876"].handler.state.value != "connected", 20)
    text = await (await run.client.get("/metrics")).text()
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    per_device = {m.group(1) for line in series if (m := re.search(r'device="([^"]+)"', line))}
    assert len(per_device) == 50 and "dev-09876" in per_device
    assert per_device - {"dev-09876"} == {f"dev-{i:05}" for i in range(49)}
    assert len(series) < 1000  # ~10 series per shown device plus the aggregates, not 100,000
    assert "iothub_gateway_devices_without_series 9950.0" in text
    counts = {m.group(1): float(m.group(2)) for line in series
              if (m := re.match(r'iothub_gateway_devices\{state="([^"]+)",transport="mqtt"\} (\S+)', line))}
    assert sum(counts.values()) == N and counts["connected"] >= N - 1
