"""The device-surface routes under hostile input: every answer is a success or a catalog error, none is a
bare 500, none hangs (in-memory upstream: its requests are refused, which must come back coded too)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.test_api_fuzz import API_FUZZ, assert_coded_answer, bodies, header_values
from tests.sidecar.fakes import fake_config

_RUNNING: dict[int, Any] = {}


async def _shared(start_sidecar: Any, tmp_path_factory: Any) -> Any:
    key = id(start_sidecar)
    if key not in _RUNNING:
        _RUNNING.clear()
        _RUNNING[key] = await start_sidecar(fake_config(tmp_path_factory.mktemp("surface-fuzz"),
                                                        api={"rate_limit": 0}))
    return _RUNNING[key]


segments = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#%"), min_size=1,
                   max_size=30)


@API_FUZZ
@given(body=bodies | st.fixed_dictionaries({"status": st.integers(-5, 2000) | st.text(max_size=5)},
                                           optional={"payload": st.text(max_size=20)}).map(
           lambda d: json.dumps(d).encode()),
       segment=segments, outcome=st.sampled_from(["complete", "reject", "abandon"]) | segments,
       creation=st.none() | header_values, device=st.sampled_from(["dev-mqtt", "dev-http", "nobody"]))
async def test_device_surface_routes_answer_with_a_code(tmp_path_factory: Any, start_sidecar: Any, body: bytes,
                                                        segment: str, outcome: str, creation: str | None,
                                                        device: str) -> None:
    run = await _shared(start_sidecar, tmp_path_factory)
    headers = {"Content-Type": "application/json"}
    if creation is not None:
        headers["iothub-creation-time-utc"] = creation
    requests = (("POST", f"/v1/devices/{device}/methods/{segment}/response"),
                ("PATCH", f"/v1/devices/{device}/twin/reported"),
                ("POST", f"/v1/devices/{device}/c2d/{segment}/{outcome}"),
                ("GET", f"/v1/devices/{device}/twin"),
                ("POST", f"/v1/devices/{device}/messages"))
    for method, path in requests:
        async with asyncio.timeout(30):
            resp = await run.client.request(method, path, data=body, headers=headers)
            raw = await resp.read()
        assert resp.status != 500, raw[:300]
        assert_coded_answer(resp.status, resp.headers, raw)
