"""Run the code blocks of README.md and docs/**/*.md, so an example that rots fails CI.

What each fenced block's language means:

- ``python``: a complete script, run in a fresh interpreter (cwd a temporary directory, the checkout on
  ``PYTHONPATH``, a timeout); it passes when it exits 0. A ``text`` block right after it, marked
  ``<!-- docs: output -->``, is its expected stdout (compared as console output is, ``...`` included).
- ``sh`` / ``bash``: run with ``bash -e``; passes when it exits 0.
- ``console``: lines starting ``$ `` are commands (a line ending in ``\\`` continues on the next), the lines
  after a command are its expected output (stdout and stderr together). All commands of a block run in one
  bash session. Expected output is compared line by line, trailing spaces ignored: ``...`` alone on a line
  stands for any number of lines, ``...`` inside a line for any text; a command shown without output is
  run but its output is not compared. A command must exit 0, unless its output ends with ``[exit N]``.
- ``toml`` / ``json``: not run, but parsed; a TOML block shaped like a sidecar config, a policy file or a
  fault file is also validated by the loader that reads such files.
- ``text``, ``mermaid`` and no language: not code.

Markers, in an HTML comment on the line before a fence: ``<!-- docs: not-run (reason) -->`` skips a block
(a test keeps their number small). A page that contains ``<!-- docs: needs sidecar -->`` gets a running
sidecar (``iothub-gateway run``, its default config: the bundled emulator) for its shell and console
blocks; if port 8780 is taken, ``127.0.0.1:8780`` and ``iothub-gateway status`` in them are pointed at the
port it got.

No example may reach past loopback: a ``sitecustomize`` in the child's path refuses any other address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SIDECAR_MARK = "<!-- docs: needs sidecar -->"
DEFAULT_PORT = 8780
PYTHON = {"python", "py", "python3"}
SHELL = {"sh", "bash", "shell"}
CONSOLE = {"console"}
PARSED = {"toml", "json"}
PROSE = {"", "text", "mermaid"}
KNOWN = PYTHON | SHELL | CONSOLE | PARSED | PROSE

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*$")
_NOT_RUN = re.compile(r"^\s*<!--\s*docs:\s*not-run\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
_OUTPUT = re.compile(r"^\s*<!--\s*docs:\s*output\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: Path
    line: int  #: 1-based line of the opening fence
    lang: str
    text: str
    not_run: str | None = None  #: the reason, when the block is marked not-run
    needs_sidecar: bool = False
    expected: str | None = None  #: a python block's stdout, from the ``<!-- docs: output -->`` block after it

    @property
    def id(self) -> str:
        try:
            name = self.path.relative_to(REPO)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}:{self.lang or 'text'}"


def parse(text: str, path: Path) -> list[Block]:
    """Every fenced block of a Markdown text, with its marker."""
    lines = text.splitlines()
    needs_sidecar = SIDECAR_MARK in text
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        text = "\n".join(body) + "\n"
        if _OUTPUT.match(prev):
            if not blocks or blocks[-1].lang not in PYTHON:
                raise ValueError(f"{path}:{start + 1}: an output block must follow a python block")
            blocks[-1] = dataclasses.replace(blocks[-1], expected=text)
            lang = "text"
        marker = _NOT_RUN.match(prev)
        blocks.append(Block(path, start + 1, lang, text, marker["reason"].strip() if marker else None, needs_sidecar))
    return blocks


def documents(root: Path = REPO) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def collect(root: Path = REPO) -> list[Block]:
    return [b for path in documents(root) for b in parse(path.read_text(), path)]


# -- running -----------------------------------------------------------------------------------------

_GUARD = '''\
"""Docs examples: refuse any address but loopback (installed by tests/docs/runner.py)."""
import ipaddress
import socket

_LOCAL = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if host is None or str(host).lower() in _LOCAL:
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(address):
    if isinstance(address, tuple) and address and not _loopback(address[0]):
        raise ConnectionRefusedError(111, f"docs examples may only reach loopback, not {address[0]!r}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _loopback(host):
        raise socket.gaierror(socket.EAI_NONAME, f"docs examples may only reach loopback, not {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@dataclasses.dataclass
class Outcome:
    ok: bool
    detail: str = ""


class Sandbox:
    """A temporary directory that looks like a checkout (configs/, bench/, scripts/ link to the real ones)
    but keeps every file an example writes, HOME and XDG_STATE_HOME included, out of the repository."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="docs-example-"))
        guard = self.dir / ".guard"
        guard.mkdir()
        (guard / "sitecustomize.py").write_text(_GUARD)
        for name in ("configs", "bench", "scripts", "gateway", "adapters", "pyproject.toml"):
            (self.dir / name).symlink_to(REPO / name)
        bindir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
        self.env.update({
            "PYTHONPATH": os.pathsep.join([str(guard), str(REPO)]),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "HOME": str(self.dir),
            "XDG_STATE_HOME": str(self.dir / "state"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "NO_COLOR": "1",
        })
        self.env.pop("IOTHUB_GATEWAY_TOKEN", None)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit // 2] + "\n[...]\n" + text[-limit // 2:]


def run_python(block: Block, sandbox: Sandbox, timeout: float = 120.0) -> Outcome:
    script = sandbox.dir / f"example_{block.line}.py"
    script.write_text(block.text)
    try:
        proc = subprocess.run([sys.executable, script.name], cwd=sandbox.dir, env=sandbox.env, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        return Outcome(False, f"exit {proc.returncode}\n{_clip(proc.stdout + proc.stderr)}")
    if block.expected is not None:
        expected = block.expected.rstrip("\n").splitlines()
        actual = proc.stdout.rstrip("\n").splitlines()
        if not output_matches(expected, actual):
            return Outcome(False, "expected output:\n" + "\n".join(expected) + "\ngot:\n" + _clip(proc.stdout))
    return Outcome(True)


def run_shell(block: Block, sandbox: Sandbox, timeout: float = 120.0) -> Outcome:
    try:
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=sandbox.dir, env=sandbox.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        return Outcome(False, f"exit {proc.returncode}\n{_clip(proc.stdout + proc.stderr)}")
    return Outcome(True)


@dataclasses.dataclass
class Command:
    command: str
    expected: list[str]  #: empty: output not compared
    status: int = 0


def parse_console(text: str) -> list[Command]:
    """``$ `` lines are commands (``\\`` continues one), the lines after them expected output."""
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if not commands:
                raise ValueError(f"console block: output before the first command: {line!r}")
            commands[-1].expected.append(line)
            i += 1
            continue
        parts = [line[2:]]
        while parts[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        commands.append(Command("\n".join(parts), []))
        i += 1
    for cmd in commands:
        while cmd.expected and not cmd.expected[-1].strip():
            cmd.expected.pop()
        if cmd.expected and (m := re.fullmatch(r"\[exit (\d+)\]", cmd.expected[-1].strip())):
            cmd.status = int(m[1])
            cmd.expected.pop()
    return commands


def _line_pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in expected.rstrip().split("...")))


def output_matches(expected: Sequence[str], actual: Sequence[str]) -> bool:
    """``...`` alone: any number of lines; inside a line: any text. Trailing spaces never count."""
    exp = [e.rstrip() for e in expected]
    act = [a.rstrip() for a in actual]
    patterns = [None if e.strip() == "..." else _line_pattern(e) for e in exp]
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        key = (i, j)
        if key not in memo:
            if i == len(exp):
                memo[key] = j == len(act)
            elif patterns[i] is None:
                memo[key] = match(i + 1, j) or (j < len(act) and match(i, j + 1))
            else:
                pattern = patterns[i]
                assert pattern is not None
                memo[key] = j < len(act) and pattern.fullmatch(act[j]) is not None and match(i + 1, j + 1)
        return memo[key]

    return match(0, 0)


_RC = "@@docs-example-status"


def run_console(block: Block, sandbox: Sandbox, timeout: float = 120.0) -> Outcome:
    try:
        commands = parse_console(block.text)
    except ValueError as exc:
        return Outcome(False, str(exc))
    script = ["exec 2>&1"]
    for cmd in commands:
        script += [cmd.command, f'printf "\\n{_RC} %s@@\\n" "$?"']
    try:
        proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=sandbox.dir, env=sandbox.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"timed out after {timeout:.0f} s")
    segments = re.split(rf"\n{_RC} (\d+)@@\n", "\n" + proc.stdout)
    # ['', out1, rc1, out2, rc2, ..., rest]; out_k starts with the newline put in front above / after rc
    results = [(segments[k].removeprefix("\n"), int(segments[k + 1])) for k in range(0, len(segments) - 1, 2)]
    if len(results) != len(commands):
        return Outcome(False, f"the session ended early ({len(results)} of {len(commands)} commands ran)\n"
                              f"{_clip(proc.stdout)}")
    for cmd, (out, status) in zip(commands, results, strict=True):
        lines = out.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if status != cmd.status:
            return Outcome(False, f"$ {cmd.command}\nexited {status}, expected {cmd.status}\n{_clip(out)}")
        if cmd.expected and not output_matches(cmd.expected, lines):
            return Outcome(False, f"$ {cmd.command}\nexpected:\n" + "\n".join(cmd.expected)
                                  + "\ngot:\n" + _clip("\n".join(lines)))
    return Outcome(True)


# -- parsed blocks -------------------------------------------------------------------------------------

_SIDECAR_SECTIONS = {"api", "outbox", "delivery", "logging", "upstream", "policy", "devices", "amqp", "metrics"}
_POLICY_SECTIONS = {"retry", "reconnect", "throttle", "identity", "quota", "device", "operation", "drops", "codes"}
_KEY = "c2VjcmV0LWtleS1mb3ItZG9jcy1leGFtcGxlcy0wMDA="  # base64; any 32 bytes do for a config check


def _fake_env(data: dict[str, Any]) -> dict[str, str]:
    """Values for the secrets a config names by variable (the check must not depend on the machine)."""
    env: dict[str, str] = {}
    api = data.get("api")
    if isinstance(api, dict) and isinstance(api.get("token_env"), str):
        env[api["token_env"]] = "docs-example-token-7Qx9"
    for device in data.get("devices") or ():
        if isinstance(device, dict) and isinstance(device.get("connection_string_env"), str):
            env[device["connection_string_env"]] = (
                f"HostName=example.azure-devices.net;DeviceId={device.get('id')};SharedAccessKey={_KEY}")
    return env


def check_parsed(block: Block, sandbox: Sandbox | None = None) -> Outcome:
    if block.lang == "json":
        try:
            json.loads(block.text)
        except json.JSONDecodeError as exc:
            return Outcome(False, f"not JSON: {exc}")
        return Outcome(True)
    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as exc:
        return Outcome(False, f"not TOML: {exc}")
    keys = set(data)
    try:
        if keys and keys <= {"faults"}:
            from gateway.emulator import Fault

            for entry in data["faults"]:
                Fault.from_dict(entry)
        elif keys and keys <= _POLICY_SECTIONS:
            from gateway.policy import PolicyConfig

            PolicyConfig.from_mapping(data, source="docs")
        elif keys and keys <= _SIDECAR_SECTIONS:
            from gateway.sidecar.config import parse_config

            base = sandbox.dir if sandbox is not None else REPO
            parse_config(data, source="docs", base=base, env=_fake_env(data))
        elif keys:
            return Outcome(False, f"TOML of no known kind (sections {sorted(keys)}): neither a sidecar config, "
                                  "a policy nor a fault file")
    except Exception as exc:
        return Outcome(False, f"the loader refused it: {type(exc).__name__}: {exc}")
    return Outcome(True)


# -- the sidecar for pages that need one ---------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sidecar(sandbox: Sandbox, timeout: float = 60.0) -> Iterator[int]:
    """``iothub-gateway run`` with its default config, on 8780 if free; yields the port, stops it after."""
    port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    log = (sandbox.dir / f"sidecar-{port}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--port", str(port)], cwd=sandbox.dir,
                            env=sandbox.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the sidecar exited {proc.returncode}: "
                                   f"{(sandbox.dir / f'sidecar-{port}.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200 and _all_connected(port):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the sidecar was not ready within {timeout:.0f} s")
            time.sleep(0.2)
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _all_connected(port: int) -> bool:
    """The demo devices are up, so the first example does not race the connects."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/devices", timeout=2) as resp:
        devices = json.loads(resp.read()).get("devices", [])
    return bool(devices) and all(d.get("state") == "connected" for d in devices)


def pointed_at(block: Block, port: int) -> Block:
    if port == DEFAULT_PORT:
        return block
    text = block.text.replace(f"127.0.0.1:{DEFAULT_PORT}", f"127.0.0.1:{port}")
    text = re.sub(r"iothub-gateway status(?! --url)", f"iothub-gateway status --url http://127.0.0.1:{port}", text)
    return dataclasses.replace(block, text=text)


def run(block: Block, sandbox: Sandbox) -> Outcome:
    """Run or check one block (a not-run or prose block passes)."""
    if block.not_run is not None or block.lang in PROSE:
        return Outcome(True, "not run")
    if block.lang in PYTHON:
        return run_python(block, sandbox)
    if block.lang in SHELL:
        return run_shell(block, sandbox)
    if block.lang in CONSOLE:
        return run_console(block, sandbox)
    if block.lang in PARSED:
        return check_parsed(block, sandbox)
    return Outcome(False, f"unknown block language {block.lang!r} (known: {', '.join(sorted(KNOWN - {''}))})")
