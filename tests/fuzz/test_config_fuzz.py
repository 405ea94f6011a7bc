"""The configuration loader under hostile input (issue 13): a ``ConfigError`` listing problems, or a config.

Whatever the document holds (wrong types, huge numbers, NaN, unknown keys, garbage text), the loader
answers with :class:`ConfigError` (one line per problem, ``iothub-gateway run`` prints them and exits 2),
never another exception, and never echoes a secret it was given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sidecar.config import ConfigError, SidecarConfig, load_config, parse_config

SECRET = "SharedAccessKey=cGxhbnRlZC1jb25maWctc2VjcmV0"

values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
        st.just(5000).map(lambda n: 10**n),  # drawn through map: hypothesis cannot print it
        st.sampled_from(["127.0.0.1", "0.0.0.0", "mqtt", "http", "amqp", "emulator", "iothub",
                         f"HostName=h;DeviceId=d;{SECRET}", "NORMAL", "json", "DEBUG"]),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
KEYS = {
    "api": ["host", "port", "token", "token_env", "token_file", "max_body", "rate_limit", "rate_burst"],
    "outbox": ["path", "max_messages", "ttl", "synchronous"],
    "delivery": ["max_inflight", "shutdown_deadline"],
    "logging": ["format", "level", "error_interval"],
    "upstream": ["kind", "host_name", "host", "tls", "ca_file", "ports"],
    "policy": ["file", "operation", "throttle", "codes"],
}
sections = {name: st.dictionaries(st.sampled_from(keys), values, max_size=4) | values for name, keys in KEYS.items()}
device = st.dictionaries(st.sampled_from(["id", "protocol", "connection_string", "connection_string_env",
                                          "mqtt_version", "x"]), values, max_size=5)
documents = st.fixed_dictionaries({}, optional={**sections, "devices": st.lists(device | values, max_size=3) | values})

CONFIG_FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


@CONFIG_FUZZ
@given(documents)
def test_parse_config_answers_a_config_or_a_config_error(document: dict[str, object]) -> None:
    try:
        config = parse_config(document, source="fuzz", env={"TOK": "a-strong-token-1"})
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        assert "cGxhbnRlZC1jb25maWctc2VjcmV0" not in str(exc)  # a connection string is never echoed
        return
    assert isinstance(config, SidecarConfig)


@pytest.mark.parametrize(
    "text",
    [
        "[api]\nport = " + "9" * 5000,  # over Python's int-to-str limit: tomllib itself raises ValueError
        "[api]\nport = " + "9" * 400,  # no float holds it
        "[api]\nrate_limit = " + "9" * 400,
        "[outbox]\nttl = nan\n",
        "[api]\nrate_limit = inf\n",
        "\x00\xff not toml",
        "[api]\ntoken = \"abc\"\n",  # a weak token
    ],
    ids=["5000-digits", "400-digits", "float-overflow", "nan", "inf", "garbage", "weak-token"],
)
def test_load_config_refuses_hostile_files_with_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert all(len(problem) < 1000 for problem in info.value.problems)
