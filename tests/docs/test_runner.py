"""The runner must be able to fail: broken blocks fed to it are reported, good ones pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs import runner

PAGE = '''# A page

```python
import sys
print("fine")
sys.exit(0)
```

```python
from gateway.codes import code_of
print(code_of("NoSuchName"))
```

<!-- docs: not-run (needs a cloud hub) -->
```python
raise SystemExit(3)
```

```console
$ iothub-gateway explain 429001
429001 ThrottlingException
...
  action:      throttle
...
$ iothub-gateway explain 429001 | head -1
429001 SomethingElse
```

```console
$ iothub-gateway explain nope
iothub-gateway explain: ...
[exit 2]
```

```toml
[reconnect]
cap = -1.0
```

```toml
[[devices]]
id = "d1"
protocol = "carrier-pigeon"
```

```json
{"a": 1,}
```

```sh
false
```

```python
import socket
socket.create_connection(("192.0.2.1", 443), timeout=2)
```

```python
print("one")
print("two")
```

<!-- docs: output -->
```text
one
three
```
'''


@pytest.fixture(scope="module")
def sandbox() -> Iterator[runner.Sandbox]:
    box = runner.Sandbox()
    yield box
    box.close()


def blocks() -> list[runner.Block]:
    return runner.parse(PAGE, Path("page.md"))


def test_parse_finds_blocks_markers_and_lines() -> None:
    found = blocks()
    assert [b.lang for b in found] == ["python", "python", "python", "console", "console", "toml", "toml", "json",
                                       "sh", "python", "python", "text"]
    assert found[10].expected == "one\nthree\n"
    assert found[2].not_run == "needs a cloud hub"
    assert found[0].line == 3
    assert not any(b.needs_sidecar for b in found)


def test_good_blocks_pass_and_broken_ones_fail(sandbox: runner.Sandbox) -> None:
    ok, missing_name, not_run, wrong_output, exit2, bad_policy, bad_config, bad_json, false, far, printed, _ = blocks()
    assert runner.run(ok, sandbox).ok
    failed = runner.run(missing_name, sandbox)
    assert not failed.ok and "NoSuchName" in failed.detail
    assert runner.run(not_run, sandbox).ok  # skipped, and counted by test_few_blocks_are_not_run
    failed = runner.run(wrong_output, sandbox)
    assert not failed.ok and "SomethingElse" in failed.detail
    assert runner.run(exit2, sandbox).ok
    assert not runner.run(bad_policy, sandbox).ok
    failed = runner.run(bad_config, sandbox)
    assert not failed.ok and "protocol" in failed.detail
    assert not runner.run(bad_json, sandbox).ok
    assert not runner.run(false, sandbox).ok
    failed = runner.run(far, sandbox)
    assert not failed.ok and "loopback" in failed.detail
    failed = runner.run(printed, sandbox)
    assert not failed.ok and "three" in failed.detail
    assert runner.run(dataclasses.replace(printed, expected="one\n...\n"), sandbox).ok


@pytest.mark.parametrize(("expected", "actual", "ok"), [
    (["a", "b"], ["a", "b  "], True),
    (["a", "..."], ["a", "b", "c"], True),
    (["...", "c"], ["a", "b", "c"], True),
    (["a ... z"], ["a then z"], True),
    (["a", "b"], ["a", "b", "c"], False),
    (["a...", "c"], ["ab", "x", "c"], False),
    (["..."], [], True),
])
def test_output_matching(expected: list[str], actual: list[str], ok: bool) -> None:
    assert runner.output_matches(expected, actual) is ok


def test_console_continuations_and_exit_status() -> None:
    cmds = runner.parse_console("$ echo a \\\n    b\na b\n$ false\n[exit 1]\n")
    assert [(c.command, c.expected, c.status) for c in cmds] == [("echo a \\\n    b", ["a b"], 0), ("false", [], 1)]
