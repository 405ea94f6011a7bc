"""Config validation: one clear line per problem, secrets from env/files, exit 2 from the CLI."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.sidecar.config import ConfigError, SidecarConfig, load_config, parse_config
from tests.sidecar.fakes import PLANTED_KEY, connection_string

ROOT = Path(__file__).resolve().parents[2]


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="t.toml", env=env or {})
    return info.value.problems


def iothub(*devices: dict[str, Any], **upstream: Any) -> dict[str, Any]:
    return {"upstream": {"kind": "iothub", **upstream}, "devices": list(devices)}


def test_the_shipped_config_is_the_builtin_default():
    shipped = load_config(ROOT / "configs" / "gateway.toml", env={})
    default = parse_config({}, env={})
    for section in ("api", "outbox", "delivery", "logging", "upstream", "devices"):
        assert getattr(shipped, section) == getattr(default, section), section
    assert shipped.upstream.kind == "emulator"
    assert {d.protocol for d in shipped.devices} == {"mqtt", "amqp", "http"}
    assert shipped.policy.config == default.policy.config
    assert SidecarConfig().api.host == "127.0.0.1"


@pytest.mark.parametrize(("data", "expected"), [
    ({"apii": {}}, "top level: unknown key 'apii'"),
    ({"api": {"prot": 1}}, "[api]: unknown key 'prot'"),
    ({"api": {"port": 70000}}, "[api] port: expected a whole number in [0, 65535], got 70000"),
    ({"api": {"port": "80"}}, "[api] port: expected a whole number"),
    ({"api": {"rate_limit": -1}}, "[api] rate_limit: expected a number >= 0"),
    ({"outbox": {"synchronous": "OFF"}}, "[outbox] synchronous: expected one of 'NORMAL', 'FULL'"),
    ({"outbox": {"max_messages": 0}}, "[outbox] max_messages: expected a whole number >= 1"),
    ({"logging": {"format": "xml"}}, "[logging] format: expected one of 'text', 'json'"),
    ({"upstream": {"kind": "cloud"}}, "[upstream] kind: expected one of 'emulator', 'iothub'"),
    ({"upstream": {"tls": False}}, "[upstream] tls: only for kind = \"iothub\""),
    ({"policy": {"codes": {"NoSuchCode": {"action": "retry"}}}}, "unknown code name 'NoSuchCode'"),
    ({"policy": {"codes": {"429999": {"action": "retry"}}}}, "unknown code 429999"),
    ({"policy": {"codes": {"999999": {"action": "retry"}}}}, "[codes.999999]: not a six-digit IoT Hub error code"),
    ({"policy": {"retry": {"jitter": 2}}}, "[retry] jitter: must be within [0, 1]"),
    ({"policy": {"file": "nope.toml"}}, "[policy] file: no such file"),
    ({"devices": [{"id": "a", "protocol": "coap"}]}, "devices[0] (a) protocol: expected one of mqtt, amqp, http"),
    ({"devices": [{"id": "bad id!", "protocol": "mqtt"}]}, "devices[0] id: expected an IoT Hub device id"),
    ({"devices": [{"id": "a", "protocol": "mqtt"}, {"id": "a", "protocol": "http"}]},
     "devices[1] (a) id: configured twice"),
    ({"devices": [{"id": "a", "protocol": "mqtt", "colour": 1}]}, "devices[0]: unknown key 'colour'"),
    ({"devices": [{"id": "a", "protocol": "mqtt", "mqtt_version": 3}]}, "mqtt_version: expected 4 (MQTT 3.1.1) or 5"),
    ({"devices": [{"id": "a", "protocol": "http", "mqtt_version": 5}]}, "mqtt_version: only for protocol"),
    ({"devices": [{"id": "a", "protocol": "mqtt", "connection_string_env": "X"}]}, "not used with the emulator"),
    ({"api": {"host": "0.0.0.0"}}, "[api] host: '0.0.0.0' is not a loopback address: set token_env or token_file"),
    (iothub({"id": "a", "protocol": "mqtt"}), "devices[0] (a): missing secret: set connection_string_env"),
    (iothub({"id": "a", "protocol": "mqtt", "connection_string_env": "A_CS"}),
     "missing secret: environment variable A_CS is not set"),
    (iothub({"id": "a", "protocol": "mqtt", "connection_string_file": "/nonexistent/a"}),
     "missing secret: cannot read /nonexistent/a"),
    (iothub({"id": "a", "protocol": "mqtt", "connection_string": connection_string("b")}),
     "is for device 'b', not 'a'"),
    (iothub(), "expected one or more [[devices]] tables"),
    ({"upstream": {"kind": "iothub", "tls": False, "host": "hub.example.com"},
      "devices": [{"id": "a", "protocol": "mqtt", "connection_string": connection_string("a")}]},
     "[upstream] tls: false is allowed only with a loopback host"),
])
def test_each_problem_is_one_clear_line(data: dict[str, Any], expected: str):
    found = problems(data)
    assert len(found) == 1, found
    assert found[0].startswith("t.toml: ") and expected in found[0], found[0]


def test_every_problem_is_reported_at_once():
    found = problems({"api": {"port": -1, "host": 5}, "outbox": {"ttl": "long"}, "logging": {"level": "loud"}})
    assert len(found) == 4


def test_secrets_from_env_and_file(tmp_path: Path):
    secret_file = tmp_path / "cs"
    secret_file.write_text(connection_string("b") + "\n")
    data = iothub({"id": "a", "protocol": "mqtt", "connection_string_env": "A_CS"},
                  {"id": "b", "protocol": "amqp", "connection_string_file": "cs"})
    cfg = parse_config(data, source="t", base=tmp_path, env={"A_CS": connection_string("a")})
    assert [d.parsed().device_id for d in cfg.devices] == ["a", "b"]
    assert PLANTED_KEY in cfg.secrets()
    assert PLANTED_KEY not in repr(cfg)  # secrets never show in reprs


def test_a_malformed_secret_is_not_echoed():
    found = problems(iothub({"id": "a", "protocol": "mqtt", "connection_string_env": "A_CS"}),
                     env={"A_CS": PLANTED_KEY})
    assert len(found) == 1 and PLANTED_KEY not in found[0] and "connection string" in found[0]


def test_non_loopback_bind_is_fine_with_a_token():
    cfg = parse_config({"api": {"host": "0.0.0.0", "token_env": "TOK"}}, env={"TOK": "s3cret-token"})
    assert cfg.api.token is not None and cfg.api.token.reveal() == "s3cret-token"


def test_cli_run_with_a_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path, capsys: Any):
    bad = tmp_path / "bad.toml"
    bad.write_text('[api]\nport = "x"\n[policy.codes.NoSuchCode]\naction = "retry"\n')
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("iothub-gateway run: ") for line in err)
    assert "Traceback" not in "\n".join(err)
    broken = tmp_path / "broken.toml"
    broken.write_text("[api\n")
    assert main(["run", "--config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_shipped_config_is_valid_toml_with_only_known_keys():
    data = tomllib.loads((ROOT / "configs" / "gateway.toml").read_text())
    parse_config(data, env={})
