"""README stays short and every link in it and in docs/ leads somewhere; the code reference (generated from
the catalog at build time, docs/_hooks/generate.py) lists every code exactly once, as the catalog says."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest

from gateway.codes import all_codes

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_COMMENT = re.compile(r"<!--.*?-->", re.S)  # commented-out images wait for files from other branches


def _links(page: pathlib.Path) -> list[str]:
    return _LINK.findall(_COMMENT.sub("", page.read_text()))


def _generate():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "_hooks" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: pathlib.Path) -> None:
    generated = {f"{slug}.md" for slug in _generate().code_pages()}
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        resolved = (page.parent / path).resolve()
        if not resolved.exists() and not (resolved.parent.name == "codes" and resolved.name in generated):
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_the_readme_reaches_every_docs_page_in_two_clicks() -> None:
    """README links to docs pages; those (with the site's nav) reach the rest: here, README -> index pages."""
    linked = {(README.parent / t.split("#")[0]).resolve() for t in _links(README)
              if not re.match(r"[a-z]+:", t) and not t.startswith("#")}
    reached = set(linked)
    for page in linked:
        if page.suffix == ".md" and page.exists():
            reached |= {(page.parent / t.split("#")[0]).resolve() for t in _links(page)
                        if not re.match(r"[a-z]+:", t) and not t.startswith("#")}
    pages = {p.resolve() for p in PAGES[1:]}
    assert pages - reached == set(), f"not reachable from README in two clicks: {sorted(pages - reached)}"


def test_code_reference_lists_every_code_once() -> None:
    gen = _generate()
    pages = gen.code_pages()
    listed = [row.code for _, rows in pages.values() for row in rows]
    assert sorted(listed) == [row.code for row in all_codes()]
    text = "".join(gen.code_page(slug) for slug in pages)
    for row in all_codes():
        assert text.count(f'<span id="{row.code}">{row.code}</span> | **{row.name}**') == 1, row.code
        assert row.description.replace("|", "\\|") in text
