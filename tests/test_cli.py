"""The CLI: one clear line and exit 2 on bad input, real answers otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gateway.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_by_number_alias_and_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "429001")
    assert code == 0 and "ThrottlingException" in out and "throttle" in out and "429" in out
    assert "DeviceNotOnline" in run(capsys, "explain", "404102")[1]
    assert "400027" in run(capsys, "explain", "ConnectionForcefullyClosedOnNewConnection")[1]
    fam = run(capsys, "explain", "500123")[1]
    assert "status family" in fam and "transient:   yes" in fam


def test_codes_json_is_the_whole_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "codes", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["code"] for r in rows} >= {400027, 409002, 412002, 503008}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["explain", "12"], "six-digit"),
        (["explain", "nonsense"], "nonsense"),
        (["classify"], "exactly one"),
        (["classify", "--http", "abc"], "abc"),
        (["classify", "--http", "700"], "700"),
        (["classify", "--http", "429", "--header", "no-colon"], "no-colon"),
        (["classify", "--mqtt", "300", "--mqtt-version", "5"], "300"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and needle in err


def test_classify_each_transport(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "classify", "--http", "429", "--header", "Retry-After: 7", "--body",
                       '{"Message":"ErrorCode:ThrottlingException;Too many requests"}')
    assert code == 0 and out.startswith("429001 ThrottlingException") and "retry after 7s" in out
    assert run(capsys, "classify", "--mqtt", "142", "--mqtt-version", "5", "--packet", "disconnect")[1].startswith(
        "400027 ")
    assert run(capsys, "classify", "--amqp", "amqp:link:stolen")[1].startswith("409002 ")
    assert run(capsys, "classify", "--topic", "$iothub/twin/res/429/?$rid=1")[1].startswith("429")
    assert run(capsys, "classify", "--http", "204")[1].strip() == "not an error"
    data = json.loads(run(capsys, "classify", "--mqtt", "151", "--mqtt-version", "5", "--packet", "puback",
                          "--property", "status=0502", "--json")[1])
    assert data["code"] == 403002 and data["exact"] is True


def test_help_everywhere_and_the_console_script() -> None:
    for argv in ([], ["codes"], ["explain"], ["classify"]):
        out = subprocess.run([sys.executable, "-m", "gateway.cli", *argv, "--help"],
                             check=False, capture_output=True, text=True)
        assert out.returncode == 0 and "usage:" in out.stdout


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "gateway.cli", "--version"], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"iothub-gateway {version('iothub-error-adapter')}"
