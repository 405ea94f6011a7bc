"""Device lists for fleets: ``[devices]`` file (JSON Lines), dir and the emulator's registry; the AMQP
multiplexing switches; hostile device files (fuzzed) answer a ConfigError naming the line, never crash."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.emulator import Hub
from gateway.sidecar.config import ConfigError, parse_config

HUB = "fleet.azure-devices.net"
KEY = "a2V5LW9mLXRoZS1mbGVldC0wMTIzNDU2Nzg5YWJjZGU="


def _cs(device_id: str) -> str:
    return f"HostName={HUB};DeviceId={device_id};SharedAccessKey={KEY}"


def _iothub(devices: object, **extra: object) -> dict[str, object]:
    return {"upstream": {"kind": "iothub"}, "devices": devices, **extra}


def _problems(data: dict[str, object], base: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="gw.toml", base=base, env=env or {})
    return info.value.problems


def test_a_jsonl_file_lists_thousands_of_devices_with_secrets_from_files_and_env(tmp_path: Path) -> None:
    (tmp_path / "fleet" / "keys").mkdir(parents=True)
    (tmp_path / "fleet" / "keys" / "leaf-2.cs").write_text(_cs("leaf-2") + "\n")
    lines = ["# the fleet", ""]
    lines.append(json.dumps({"id": "leaf-0", "protocol": "amqp", "connection_string": _cs("leaf-0")}))
    lines.append(json.dumps({"id": "leaf-1", "protocol": "mqtt", "mqtt_version": 5,
                             "connection_string_env": "LEAF_1"}))
    lines.append(json.dumps({"id": "leaf-2", "connection_string_file": "keys/leaf-2.cs", "multiplex": False}))
    lines += [json.dumps({"id": f"bulk-{i:05}", "connection_string": _cs(f"bulk-{i:05}")}) for i in range(5000)]
    (tmp_path / "fleet" / "devices.jsonl").write_text("\n".join(lines) + "\n")
    cfg = parse_config(_iothub({"file": "fleet/devices.jsonl", "protocol": "amqp"}), source="gw.toml",
                       base=tmp_path, env={"LEAF_1": _cs("leaf-1")})
    assert len(cfg.devices) == 5003
    leaf0, leaf1, leaf2 = (cfg.device(d) for d in ("leaf-0", "leaf-1", "leaf-2"))
    assert leaf0 is not None and leaf1 is not None and leaf2 is not None
    assert (leaf1.protocol, leaf1.mqtt_version) == ("mqtt", 5)
    assert leaf2.protocol == "amqp" and leaf2.parsed().device_id == "leaf-2"  # relative to the devices file
    assert cfg.multiplexed(leaf0) and not cfg.multiplexed(leaf2) and not cfg.multiplexed(leaf1)
    assert cfg.device("bulk-04999") is not None and cfg.amqp.devices_per_connection == 1000
    assert _cs("leaf-1") in cfg.secrets()


def test_a_dir_holds_one_device_per_json_or_toml_file_and_jsonl_files_of_many(tmp_path: Path) -> None:
    d = tmp_path / "devices.d"
    d.mkdir()
    (d / "a.json").write_text(json.dumps({"id": "a", "protocol": "http"}))
    (d / "b.toml").write_text('id = "b"\nprotocol = "mqtt"\n')
    (d / "more.jsonl").write_text('{"id": "c"}\n{"id": "d", "protocol": "amqp", "multiplex": true}\n')
    (d / "README.md").write_text("not a device")
    (d / ".hidden.json").write_text("{")
    cfg = parse_config({"devices": {"dir": str(d), "protocol": "amqp"}, "amqp": {"multiplex": False}},
                       source="gw.toml", env={})
    assert [(x.id, x.protocol) for x in cfg.devices] == [("a", "http"), ("b", "mqtt"), ("c", "amqp"), ("d", "amqp")]
    c, dd = cfg.device("c"), cfg.device("d")
    assert c is not None and dd is not None
    assert not cfg.multiplexed(c) and cfg.multiplexed(dd)  # [amqp] multiplex = false, but d says true


def test_the_emulators_registry_lists_the_devices_for_local_runs(tmp_path: Path) -> None:
    hub = Hub()
    for i in range(30):
        hub.add_device(f"reg-{i}")
    registry = tmp_path / "registry.json"
    hub.save_registry(registry)
    cfg = parse_config({"devices": {"registry": "registry.json"}}, source="gw.toml", base=tmp_path, env={})
    assert sorted(d.id for d in cfg.devices) == sorted(f"reg-{i}" for i in range(30))
    assert {d.protocol for d in cfg.devices} == {"amqp"} and cfg.registry == str(registry)
    assert any("only with kind" in p for p in _problems(_iothub({"registry": "registry.json"}), tmp_path))
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert any("not an emulator registry" in p for p in _problems({"devices": {"registry": "bad.json"}}, tmp_path))


def test_problems_name_the_file_and_line(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "ok-1", "connection_string": _cs("ok-1")}),
        "{not json",
        json.dumps({"id": "bad id with spaces", "connection_string": _cs("x")}),
        json.dumps({"id": "ok-1", "connection_string": _cs("ok-1")}),
        json.dumps({"id": "p", "protocol": "carrier-pigeon", "connection_string": _cs("p")}),
        json.dumps({"id": "m", "protocol": "mqtt", "multiplex": True, "connection_string": _cs("m")}),
        json.dumps({"id": "e", "connection_string_env": "NOPE"}),
        json.dumps({"id": "w", "connection_string": _cs("someone-else")}),
        json.dumps(["a", "list"]),
        json.dumps({"id": "k", "colour": "red", "connection_string": _cs("k")}),
        "[" * 100_000,
    ]
    (tmp_path / "devices.jsonl").write_text("\n".join(lines) + "\n" + "x" * 70_000 + "\n")
    problems = _problems(_iothub({"file": "devices.jsonl", "protocol": "amqp"}), tmp_path)
    text = "\n".join(problems)
    for line, words in [(2, "not valid JSON"), (3, "expected an IoT Hub device id"), (4, "configured twice"),
                        (5, "expected one of mqtt, amqp, http"), (6, 'only for protocol = "amqp"'),
                        (7, "environment variable NOPE is not set"), (8, "is for device 'someone-else'"),
                        (9, "expected a table"), (10, "unknown key 'colour'"), (11, "longer than 65536 bytes"),
                        (12, "longer than 65536 bytes")]:
        assert any(p.startswith(f"gw.toml: devices.jsonl:{line}") and words in p for p in problems), (line, text)
    assert KEY not in text  # a secret never shows in a problem


def test_switches_and_sources_are_validated(tmp_path: Path) -> None:
    problems = "\n".join(_problems({"amqp": {"multiplex": "yes", "devices_per_connection": 1001, "x": 1},
                                    "metrics": {"per_device_max": -1},
                                    "devices": {"file": "missing.jsonl", "dir": "nowhere", "protocol": "smtp"}},
                                   tmp_path))
    for words in ("[amqp] multiplex: expected true or false", "[amqp] devices_per_connection: expected a whole number "
                  "in [1, 1000]", "[amqp]: unknown key 'x'", "[metrics] per_device_max", "cannot read",
                  "cannot list", "[devices] protocol: expected one of"):
        assert words in problems, words
    assert "give file" in "\n".join(_problems({"devices": {}}, tmp_path))
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    assert "list no devices" in "\n".join(_problems({"devices": {"file": "empty.jsonl"}}, tmp_path))


def test_problems_from_device_files_are_capped(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("nope\n" * 10_000)
    problems = _problems({"devices": {"file": "d.jsonl"}}, tmp_path)
    assert len(problems) == 51 and problems[-1].endswith("and 9950 more problem(s) in the device files")


# -- fuzz: whatever the file holds, a config or a ConfigError naming a line; never a crash or a hang --

_ids = st.text(alphabet=string.ascii_letters + string.digits + "-:._", min_size=1, max_size=12)
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=3), max_leaves=8)
_entries = st.fixed_dictionaries({"id": _ids | _values}, optional={
    "protocol": st.sampled_from(["mqtt", "amqp", "http", "x"]) | _values,
    "mqtt_version": st.sampled_from([4, 5]) | _values,
    "multiplex": st.booleans() | _values,
    "connection_string": _values, "extra": _values,
})
_lines = st.lists(st.one_of(_entries.map(json.dumps), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                            _values.map(json.dumps)), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_lines, protocol=st.sampled_from([None, "amqp", "mqtt"]))
def test_any_device_file_is_a_config_or_problems_naming_lines(tmp_path: Path, lines: list[str],
                                                              protocol: str | None) -> None:
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    devices: dict[str, object] = {"file": str(path)}
    if protocol is not None:
        devices["protocol"] = protocol
    try:
        cfg = parse_config({"devices": devices}, source="gw.toml", env={})
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.startswith(("gw.toml: fuzz.jsonl:", "gw.toml: [devices]")), problem
        return
    assert cfg.devices and len({d.id for d in cfg.devices}) == len(cfg.devices)
