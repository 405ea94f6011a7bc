"""The redactor with a fleet's secrets: 10,000 device connection strings must not make every answer slow,
and each is still blanked whole, its key alone in any spelling too."""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

from gateway.sidecar.security import MASK, Redactor


def _cs(i: int, key: str) -> str:
    return f"HostName=hub.azure-devices.net;DeviceId=leaf-{i};SharedAccessKey={key}"


def test_ten_thousand_device_keys_are_blanked_without_an_alternation_per_secret() -> None:
    keys = [base64.b64encode(i.to_bytes(32, "big")).decode() for i in range(10_000)]
    redactor = Redactor([_cs(i, k) for i, k in enumerate(keys)] + ["an-api-token-0123456789"])
    assert redactor._literal is not None and "leaf-" not in redactor._literal.pattern  # only the API token
    page = json.dumps({"devices": [{"id": f"leaf-{i}", "state": "connected"} for i in range(1000)]})
    assert redactor(page) == page
    leak = (f"cs {_cs(17, keys[17])}; key {keys[4242]}; encoded {quote(keys[9999], safe='')}; "
            f"json {json.dumps(keys[5])}; token an-api-token-0123456789")
    out = redactor(leak)
    for secret in (keys[17], keys[4242], quote(keys[9999], safe=""), keys[9999], keys[5], "an-api-token"):
        assert secret not in out
    assert "leaf-17" not in out  # the connection string went whole
    assert out.count(MASK) == 5
