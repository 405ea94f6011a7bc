"""MkDocs hook: adds the generated code-reference pages and fills ``<!-- generate: NAME -->`` placeholders.

Everything generated comes from ``generate.py`` beside this file (pure functions over the code).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parents[1]))  # the checkout: gateway/ and adapters/ importable
_spec = importlib.util.spec_from_file_location("docs_generate", _HERE / "generate.py")
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def _code_nav() -> list[Any]:
    return [{"Overview": "codes/index.md"},
            *({title: f"codes/{slug}.md"} for slug, (title, _) in generate.code_pages().items())]


def on_config(config: Any) -> Any:
    """Put the generated family pages under the nav's "Code reference" entry."""
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Code reference" in item:
            item["Code reference"] = _code_nav()
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for slug in generate.code_pages():
        files.append(File.generated(config, f"codes/{slug}.md", content=generate.code_page(slug)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return str(generate.expand(markdown))
