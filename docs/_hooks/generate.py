"""Pages and tables generated from the code at build time, so the docs cannot drift from it.

- the code reference, one page per status family, from ``gateway/codes.py`` (the one table);
- the error tree (Mermaid) from the ``IoTHubError`` classes and the catalog;
- the policy's decision table, by asking ``gateway.policy.Policy`` itself for each action;
- the handler's state machine (Mermaid) from ``gateway.handler.machine.TRANSITIONS``;
- the emulator's known differences from the real hub, from ``gateway/emulator/__init__.py``'s docstring;
- the sidecar's API reference, from ``gateway/sidecar/openapi.json``.

Pure functions returning Markdown; ``docs/_hooks/mkdocs_hook.py`` puts them into the site, and
``tests/docs/test_generated.py`` checks them against their sources.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# -- the code reference ------------------------------------------------------------------------------

_CLASS_PAGES = {3: ("other-3xx", "Other 3xx statuses"), 4: ("other-4xx", "Other 4xx statuses"),
                5: ("other-5xx", "Other 5xx statuses")}


def code_pages() -> dict[str, tuple[str, list[Any]]]:
    """``{slug: (title, rows)}``: one page per status family with IoT Hub codes; the families that hold
    only this gateway's generic ``status * 1000`` row are grouped per status class, after its families."""
    from gateway.codes import all_codes

    families: dict[int, list[Any]] = defaultdict(list)
    for row in all_codes():
        families[row.code // 1000].append(row)
    own: dict[str, tuple[str, list[Any]]] = {}
    other: dict[str, tuple[str, list[Any]]] = {}
    for status, rows in sorted(families.items()):
        if any(r.origin == "iothub" for r in rows) or len(rows) > 1:
            own[str(status)] = (f"{status}xxx", rows)
        else:
            slug, title = _CLASS_PAGES[status // 100]
            other.setdefault(slug, (title, []))[1].extend(rows)
    order = sorted([*own, *other], key=lambda slug: (int((own.get(slug) or other[slug])[1][0].code // 100_000),
                                                      slug in other, slug))
    return {slug: own.get(slug) or other[slug] for slug in order}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def code_rows(rows: Iterable[Any]) -> str:
    """Narrow enough to read without scrolling: the facts other than the action go under the name."""
    lines = ["| code | name | action | description |", "|---|---|---|---|"]
    for row in rows:
        also = [*row.aliases, *map(str, row.alias_codes)]
        facts = [f"HTTP {row.http_status}" if row.http_status else "no HTTP form",
                 ", ".join(sorted(row.transports)), "transient" if row.transient else "not transient",
                 "IoT Hub's" if row.origin == "iothub" else "this gateway's"]
        name = f"**{row.name}**<br/><small>{' · '.join(facts)}" + (f"<br/>also {', '.join(also)}" if also else "")
        lines.append(f"| <span id=\"{row.code}\">{row.code}</span> | {name}</small> | `{row.action.value}` | "
                     f"{_cell(row.description)} |")
    return "\n".join(lines) + "\n"


def code_page(slug: str) -> str:
    from gateway.codes import Action

    title, rows = code_pages()[slug]
    status = rows[0].code // 1000
    intro = (f"Codes of the HTTP {status} family." if slug.isdigit()
             else "HTTP statuses IoT Hub has no code of its own for: each has this gateway's generic "
                  "`status * 1000` code, so a bare status from a proxy still has one.")
    actions = sorted({r.action for r in rows}, key=list(Action).index)
    return (f"# {title}\n\n{intro} Generated from `gateway/codes.py`; the actions are explained in "
            f"[handler and policy](../handler.md#what-the-policy-decides).\n\n{code_rows(rows)}\n"
            f"Actions on this page: {', '.join(f'`{a.value}`' for a in actions)}.\n")


def codes_index() -> str:
    from gateway.codes import all_codes

    rows = list(all_codes())
    lines = ["| family | codes | IoT Hub's | this gateway's |", "|---|---|---|---|"]
    for slug, (title, family) in code_pages().items():
        iothub = sum(r.origin == "iothub" for r in family)
        lines.append(f"| [{title}]({slug}.md) | {len(family)} | {iothub} | {len(family) - iothub} |")
    return (f"The catalog has {len(rows)} codes ({sum(r.origin == 'iothub' for r in rows)} of IoT Hub's own).\n\n"
            + "\n".join(lines) + "\n")


# -- the error tree ----------------------------------------------------------------------------------

def error_tree() -> str:
    """A Mermaid graph of the IoTHubError classes, each with how many catalog codes raise it."""
    from gateway import errors
    from gateway.codes import all_codes

    counts: dict[str, int] = defaultdict(int)
    for row in all_codes():
        counts[errors.error_class(row).__name__] += 1
    classes: list[type] = []

    def walk(cls: type) -> None:
        if cls not in classes:
            classes.append(cls)
            for sub in cls.__subclasses__():
                if sub.__module__ == errors.__name__ and (sub.__name__ in errors.__all__ or sub.__name__ in counts):
                    walk(sub)

    walk(errors.IoTHubError)
    lines = ["```mermaid", "graph LR"]
    for cls in classes:
        n = counts.get(cls.__name__, 0)
        label = cls.__name__ + (f"<br/>{n} code{'s' if n != 1 else ''}" if n else "")
        lines.append(f'  {cls.__name__}["{label}"]')
    for cls in classes:
        for base in cls.__bases__:
            if base in classes:
                lines.append(f"  {base.__name__} --> {cls.__name__}")
    lines.append("```")
    return "\n".join(lines) + "\n"


def error_tree_text() -> str:
    """The tree as drawn, with what to do about each branch, in ``gateway/errors.py``'s docstring."""
    from gateway import errors

    doc = errors.__doc__ or ""
    drawing = doc.split("::\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    return "```text\n" + "\n".join(line[4:] for line in drawing.splitlines()) + "\n```\n"


# -- the policy ------------------------------------------------------------------------------------------

def _describe(decision: Any) -> str:
    import dataclasses

    name = type(decision).__name__
    flags = [f.name for f in dataclasses.fields(decision)
             if isinstance(getattr(decision, f.name), bool) and getattr(decision, f.name)]
    reason = getattr(decision, "reason", None)
    extra = [str(getattr(reason, "value", reason))] if reason is not None else []
    return f"`{name}`" + (f" ({', '.join(extra + flags)})" if extra or flags else "")


_EXAMPLES = {"ServerError", "ThrottlingException", "DeviceConnectionClosedRemotely", "IotHubUnauthorized",
             "DeviceNotOnline", "IotHubQuotaExceeded", "ConnectionForcefullyClosedOnNewConnection", "DeviceNotFound",
             "MessageTooLarge"}  #: the codes people meet most, where the action has one


def decision_table() -> str:
    """For each catalog action, what :class:`gateway.policy.Policy` (the shipped defaults) decides, asked
    with an error of a code that has that action: on an operation of the connection's own device, on one
    aimed at another device, on a connect that failed, and on a live connection that dropped."""
    from gateway.codes import Action, all_codes
    from gateway.errors import make_error
    from gateway.policy import History, Operation, Policy

    policy = Policy()
    lines = ["| action | example code | on an operation | on an operation for another device | "
             "connect failed | live connection dropped |", "|---|---|---|---|---|---|"]
    for action in Action:
        rows = [r for r in all_codes() if r.action is action and r.origin == "iothub"]
        row = next((r for r in rows if r.name in _EXAMPLES), rows[0])
        err = make_error(row.code, transport="amqp")
        down = History(identity="d1", can_refresh=True)
        up = History(identity="d1", can_refresh=True, connected_at=0.0)
        cells = [
            policy.decide(err, up, now=10.0, rand=0.5, op=Operation(1, 0.0, "d1")),
            policy.decide(err, up, now=10.0, rand=0.5, op=Operation(1, 0.0, "d2")),
            policy.decide(err, down, now=10.0, rand=0.5),
            policy.decide(err, up, now=10.0, rand=0.5),
        ]
        lines.append(f"| `{action.value}` | {row.code} {row.name} | " + " | ".join(_describe(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def state_groups() -> tuple[list[Any], dict[Any, Any], list[tuple[Any, Any, Any]]]:
    """The transitions table, folded: the states that move alike on every event (the "active" ones)
    form one group with their common moves; the other edges stay as they are. Unfolding the result
    gives the table back (a test checks it)."""
    from gateway.handler.machine import TRANSITIONS, State

    moves: dict[Any, dict[Any, Any]] = defaultdict(dict)
    for (src, event), dst in TRANSITIONS.items():
        moves[src][event] = dst
    alike: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for state in State:
        alike[tuple(sorted(moves[state].items()))].append(state)
    group = max(alike.values(), key=len)
    common = dict(moves[group[0]]) if len(group) > 1 else {}
    edges = [(src, event, dst) for (src, event), dst in TRANSITIONS.items() if not (src in group and common)]
    return group if common else [], common, edges


def state_machine() -> str:
    """The handler's connection states as a Mermaid state diagram, from the transitions table."""
    from gateway.handler.machine import State

    group, common, edges = state_groups()

    def node(state: State) -> str:
        return state.name.lower()

    lines = ["```mermaid", "stateDiagram-v2", "  direction LR", f"  [*] --> {node(State.IDLE)}"]
    for state in State:
        if state not in group:
            lines.append(f"  {node(state)}: {state.value}")
    if group:
        lines.append('  state "active: operations may still succeed" as active {')
        lines += [f"    {node(state)}: {state.value}" for state in group]
        lines.append("  }")
        inner = [(e, d) for e, d in common.items() if d in group]
        lines.append("  note right of active")
        lines.append("    from any active state:")
        lines += [f"    {event.value} → {dst.value}" for event, dst in inner]
        lines.append("  end note")
        lines += [f"  active --> {node(dst)}: {event.value}" for event, dst in common.items() if dst not in group]
    lines += [f"  {node(src)} --> {node(dst)}: {event.value}" for src, event, dst in edges]
    lines.append(f"  {node(State.CLOSED)} --> [*]")
    lines.append("```")
    return "\n".join(lines) + "\n"


# -- the emulator ----------------------------------------------------------------------------------------

_TAG = re.compile(r"\[(KNOWN|ASSUMED)\]")


def emulator_entries() -> list[tuple[str, list[tuple[str, str]]]]:
    """``(behaviour, [(KNOWN|ASSUMED, source or reason), ...])`` per bullet of the emulator's docstring."""
    import gateway.emulator

    doc = gateway.emulator.__doc__ or ""
    body = doc.split("one entry per behaviour, for the docs' table:", 1)[1]
    bullets = re.split(r"\n- ", "\n" + body.strip())
    entries = []
    for bullet in bullets:
        text = " ".join(bullet.split())
        if not text:
            continue
        parts = _TAG.split(text)
        behaviour = parts[0].strip().rstrip(".")
        tags = [(parts[i], parts[i + 1].strip().strip(";").strip()) for i in range(1, len(parts) - 1, 2)]
        entries.append((behaviour, tags))
    return entries


def _rst(text: str) -> str:
    """RST literals to Markdown."""
    return _cell(text.replace("``", "`"))


def emulator_differences() -> str:
    lines = ["| behaviour | known or assumed | source, or why |", "|---|---|---|"]
    for behaviour, tags in emulator_entries():
        kinds = " / ".join(dict.fromkeys(k.lower() for k, _ in tags))
        why = "<br/>".join(f"**{k.lower()}**: {_rst(s)}" if len(tags) > 1 else _rst(s) for k, s in tags)
        lines.append(f"| {_rst(behaviour)} | {kinds} | {why} |")
    return "\n".join(lines) + "\n"


# -- the sidecar's API -----------------------------------------------------------------------------------

def openapi_document() -> dict[str, Any]:
    path = REPO / "gateway" / "sidecar" / "openapi.json"
    return dict(json.loads(path.read_text()))


def _schema_text(schema: Mapping[str, Any] | None) -> str:
    if not schema:
        return ""
    if "$ref" in schema:
        name = str(schema["$ref"]).rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    kind = schema.get("type", "")
    if kind == "array":
        return f"array of {_schema_text(schema.get('items'))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "oneOf" in schema or "anyOf" in schema:
        return " or ".join(_schema_text(s) for s in schema.get("oneOf") or schema.get("anyOf") or [])
    return f"`{kind}`" if isinstance(kind, str) and kind else f"`{json.dumps(kind)}`"


def _response(doc: Mapping[str, Any], response: Mapping[str, Any]) -> tuple[str, str]:
    if "$ref" in response:
        name = str(response["$ref"]).rsplit("/", 1)[-1]
        response = doc["components"]["responses"][name]
    content = response.get("content") or {}
    shapes = [f"{ctype}: {_schema_text(body.get('schema'))}".rstrip(": ") for ctype, body in content.items()]
    return _cell(str(response.get("description", ""))), "; ".join(shapes)


def _operations(doc: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any], str]]:
    out = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in {"get", "post", "put", "patch", "delete"}:
                anchor = re.sub(r"[^a-z0-9]+", "-", f"{method} {path}".lower()).strip("-")
                out.append((path, method, op, anchor))
    return out


def sidecar_routes() -> str:
    """The route table alone, linking into the API reference page."""
    lines = ["| method | path | summary |", "|---|---|---|"]
    for path, method, op, anchor in _operations(openapi_document()):
        lines.append(f"| {method.upper()} | [`{path}`](sidecar-api.md#{anchor}) | {_cell(op.get('summary', ''))} |")
    return "\n".join(lines) + "\n"


def openapi_markdown() -> str:
    doc = openapi_document()
    out = [f"Rendered from `gateway/sidecar/openapi.json` (OpenAPI {doc['openapi']}, API version "
           f"{doc['info']['version']}); the running sidecar serves the same document at `GET /v1/openapi.json`.\n",
           _cell(doc["info"].get("description", "")) + "\n", "## Routes\n",
           "| method | path | summary |", "|---|---|---|"]
    operations = _operations(doc)
    for path, method, op, anchor in operations:
        out.append(f"| {method.upper()} | [`{path}`](#{anchor}) | {_cell(op.get('summary', ''))} |")
    out.append("")
    for path, method, op, anchor in operations:
        out.append(f"### {method.upper()} `{path}` {{ #{anchor} }}\n")
        if op.get("summary"):
            out.append(_cell(op["summary"]) + "\n")
        if op.get("description"):
            out.append(str(op["description"]) + "\n")
        params = op.get("parameters") or []
        if params:
            out += ["| parameter | in | required | type | description |", "|---|---|---|---|---|"]
            for p in params:
                out.append(f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | "
                           f"{_schema_text(p.get('schema'))} | {_cell(p.get('description', ''))} |")
            out.append("")
        body = op.get("requestBody")
        if body:
            shapes = "; ".join(f"{ctype}: {_schema_text(v.get('schema'))}".rstrip(": ")
                               for ctype, v in (body.get("content") or {}).items())
            out.append(f"Request body{' (required)' if body.get('required') else ''}: {shapes}. "
                       f"{_cell(body.get('description', ''))}\n")
        out += ["| status | when | body |", "|---|---|---|"]
        for status, response in op.get("responses", {}).items():
            when, shape = _response(doc, response)
            out.append(f"| {status} | {when} | {shape} |")
        out.append("")
    out.append("## Schemas\n")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f"### {name} {{ #schema-{name.lower()} }}\n")
        if schema.get("description"):
            out.append(_cell(str(schema["description"])) + "\n")
        props = schema.get("properties") or {}
        if props:
            required = set(schema.get("required") or [])
            out += ["| field | type | required | description |", "|---|---|---|---|"]
            for field, spec in props.items():
                out.append(f"| `{field}` | {_schema_text(spec) or '`any`'} | {'yes' if field in required else 'no'} | "
                           f"{_cell(str(spec.get('description', '')))} |")
            out.append("")
        elif schema.get("type"):
            out.append(f"Type: {_schema_text(schema)}\n")
    return "\n".join(out) + "\n"


def config_keys() -> dict[str, list[str]]:
    """Every key the sidecar's config loader accepts, per section, read from its ``keys()`` checks."""
    import ast

    tree = ast.parse((REPO / "gateway" / "sidecar" / "config.py").read_text())
    sections: dict[str, list[str]] = {}
    constants: dict[str, ast.expr] = {}  # NAME = frozenset({...}) at module level, as its set literal
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                and isinstance(stmt.value, ast.Call) and stmt.value.args and isinstance(stmt.value.args[0], ast.Set)):
            constants[stmt.targets[0].id] = stmt.value.args[0]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "keys"
                and len(node.args) == 3):
            where = node.args[1]
            name = where.value if isinstance(where, ast.Constant) else "[[devices]]"  # the one per-entry check
            keys = node.args[2]
            if (isinstance(keys, ast.Call) and isinstance(keys.func, ast.Name) and keys.func.id == "set"
                    and len(keys.args) == 1 and isinstance(keys.args[0], ast.Name)):
                keys = constants.get(keys.args[0].id, keys)  # set(_DEVICE_KEYS): the module's constant
            if isinstance(keys, ast.Set):
                sections[str(name)] = sorted(str(k.value) for k in keys.elts if isinstance(k, ast.Constant))
    return sections


def sidecar_config() -> str:
    lines = ["| section | keys the loader accepts |", "|---|---|"]
    for where, keys in config_keys().items():
        lines.append(f"| `{where}` | {', '.join(f'`{k}`' for k in keys)} |")
    shipped = (REPO / "configs" / "gateway.toml").read_text()
    return ("\n".join(lines) + "\n\nThe shipped `configs/gateway.toml`, with every default and what it means:\n\n"
            "```toml\n" + shipped.rstrip() + "\n```\n")


GENERATORS = {
    "codes-index": codes_index,
    "error-tree": error_tree,
    "error-tree-text": error_tree_text,
    "decision-table": decision_table,
    "state-machine": state_machine,
    "emulator-differences": emulator_differences,
    "sidecar-api": openapi_markdown,
    "sidecar-config": sidecar_config,
    "sidecar-routes": sidecar_routes,
}
PLACEHOLDER = re.compile(r"<!--\s*generate:\s*([a-z-]+)\s*-->")


def expand(markdown: str) -> str:
    """Replace each ``<!-- generate: NAME -->`` with what its generator makes (an unknown name raises)."""
    return PLACEHOLDER.sub(lambda m: GENERATORS[m[1]](), markdown)
