"""What the site generates at build time (docs/_hooks/generate.py) says what its sources say."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

import gateway.emulator
from gateway.codes import Action, all_codes, lookup
from gateway.handler.machine import TRANSITIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "_hooks" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_diagram_has_exactly_the_transitions(gen: ModuleType) -> None:
    """The diagram folds the states that move alike into one box; unfolding it gives the table back."""
    group, common, edges = gen.state_groups()
    unfolded = {(src, event): dst for src, event, dst in edges}
    unfolded.update({(src, event): dst for src in group for event, dst in common.items()})
    assert unfolded == dict(TRANSITIONS)
    diagram = gen.state_machine()
    drawn = set(re.findall(r"^  (\w+) --> (\w+): (\S+)$", diagram, re.M))
    notes = set(re.findall(r"^    (\S+) → (\S+)$", diagram, re.M))
    assert drawn == ({(s.name.lower(), d.name.lower(), e.value) for s, e, d in edges}
                     | {("active", d.name.lower(), e.value) for e, d in common.items() if d not in group})
    assert notes == {(e.value, d.value) for e, d in common.items() if d in group}
    assert len(group) >= 2  # the table has such a group today; if it goes, the diagram draws every edge


def test_decision_table_has_a_row_per_action_asked_of_the_policy(gen: ModuleType) -> None:
    table = gen.decision_table()
    rows = [line for line in table.splitlines()[2:] if line.startswith("| `")]
    assert [re.match(r"\| `([a-z_]+)`", r)[1] for r in rows] == [a.value for a in Action]  # type: ignore[index]
    for row in rows:
        code = int(row.split("|")[2].split()[0])
        assert lookup(code).action.value in row
    fail = next(r for r in rows if r.startswith("| `fail`"))
    assert "`DeadLetter`" in fail and "`Stop` (refused)" in fail  # the rule the handler page explains


def test_error_tree_counts_every_code(gen: ModuleType) -> None:
    counts = [int(n) for n in re.findall(r"<br/>(\d+) codes?", gen.error_tree())]
    assert sum(counts) == len(list(all_codes()))


def test_emulator_table_has_every_docstring_entry(gen: ModuleType) -> None:
    doc = gateway.emulator.__doc__ or ""
    bullets = doc.split("for the docs' table:", 1)[1].count("\n- ")
    entries = gen.emulator_entries()
    assert len(entries) == bullets and bullets >= 20
    assert all(tags and all(kind in {"KNOWN", "ASSUMED"} and why for kind, why in tags) for _, tags in entries)
    assert "peer-sdks.md" not in gen.emulator_differences()  # a file outside this repository


def test_sidecar_api_renders_every_operation(gen: ModuleType) -> None:
    doc = gen.openapi_document()
    text = gen.openapi_markdown()
    for path, item in doc["paths"].items():
        for method in item:
            if method in {"get", "post", "put", "patch", "delete"}:
                assert f"### {method.upper()} `{path}`" in text
    for name in doc["components"]["schemas"]:
        assert f"### {name} {{ #schema-{name.lower()} }}" in text


def test_unknown_placeholder_fails_the_build(gen: ModuleType) -> None:
    with pytest.raises(KeyError):
        gen.expand("<!-- generate: no-such-table -->")


def _row(page: str, setting: str) -> str:
    return next(line for line in page.splitlines() if line.startswith(f"| {setting} |"))


def test_handler_page_defaults_are_the_policy_defaults() -> None:
    """The defaults table is prose, so each of its figures is checked against PolicyConfig()."""
    import inspect

    from adapters.mqtt.transport import MqttTransport
    from gateway.policy import PolicyConfig

    c = PolicyConfig()
    page = (ROOT / "docs" / "handler.md").read_text()
    expected = {
        "reconnect curve": [f"{c.reconnect.initial:g} s doubling to **{c.reconnect.cap:g} s**",
                            "**full jitter**" if c.reconnect.jitter == 1.0 else "?",
                            "never gives up" if not c.reconnect.max_attempts else "?"],
        "operation retry": [f"{c.retry.initial:g} s doubling to {c.retry.cap:g} s",
                            f"**{c.retry.max_attempts} attempts / {c.retry.max_elapsed:g} s**"],
        "throttle curve": [f"**{c.throttle.initial:g} s** doubling to **{c.throttle.cap:g} s**",
                           "equal jitter" if c.throttle.jitter == 0.5 else "?",
                           f"**{c.throttle.max_retry_after:g} s**"],
        "quota (403002)": [f"U[0, {c.quota.reset_jitter:g} s)", f"**{c.quota.probe_interval / 3600:g} h**"],
        "identity conflict": [f"{c.identity.initial:g} s doubling to {c.identity.cap:g} s",
                              f"**{c.identity.max_takeovers} exact takeovers within {c.identity.window / 60:g} min**",
                              f"{c.drops.takeover_repeat} inferred", f"**{c.drops.takeover_park / 60:g} min**"],
        "offline device": [f"**{c.device.max_held} items per device**", f"**{c.device.hold_timeout:g} s**"],
        "deadlines": [f"operation **{c.operation.timeout:g} s**", f"connect {c.operation.connect_timeout:g} s",
                      f"refresh hook {c.operation.refresh_timeout:g} s", f"**{c.operation.renew_before:g} s** before",
                      f"**{c.operation.renew_margin:g} s** before it"],
        "half-open links": [
            f"keep-alive **{inspect.signature(MqttTransport).parameters['keepalive'].default:g} s**",
            f"idle timeout **{_amqp_idle():g} s**",
            f"**{c.operation.timeouts_to_drop} operation timeouts in a row**"],
    }
    for setting, fragments in expected.items():
        row = _row(page, setting)
        for fragment in fragments:
            assert fragment in row, f"{setting}: {fragment!r} not in {row!r}"


def _amqp_idle() -> float:
    import inspect

    from adapters.amqp.transport import AmqpTransport

    default = inspect.signature(AmqpTransport).parameters["idle_timeout"].default
    return float(default)


def test_config_keys_cover_the_shipped_config(gen: ModuleType) -> None:
    import tomllib

    keys = gen.config_keys()
    assert {"[api]", "[outbox]", "[delivery]", "[logging]", "[upstream]", "[[devices]]"} <= set(keys)
    shipped = tomllib.loads((ROOT / "configs" / "gateway.toml").read_text())
    for section, table in shipped.items():
        entries = table if isinstance(table, list) else [table]
        where = "[[devices]]" if isinstance(table, list) else f"[{section}]"
        for entry in entries:
            assert set(entry) <= set(keys[where]), (where, set(entry) - set(keys[where]))


def test_operations_page_names_every_metric() -> None:
    source = (ROOT / "gateway" / "sidecar" / "metrics.py").read_text()
    defined = set(re.findall(r'"(iothub_gateway_[a-z_]+)"', source))
    page = (ROOT / "docs" / "operations.md").read_text()
    named = {re.sub(r"_total$", "", m) for m in re.findall(r"iothub_gateway_[a-z_]+", page)}
    assert defined and defined <= named, f"metrics the operations page does not describe: {defined - named}"
    assert named <= defined, f"metrics the page names that do not exist: {named - defined}"
