"""README's code table is generated from the catalog; this keeps the two equal."""

from __future__ import annotations

import pathlib

from gateway.cli import markdown_table

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_code_table_matches_the_catalog() -> None:
    text = README.read_text()
    begin, end = "<!-- codes:begin -->\n", "<!-- codes:end -->"
    embedded = text[text.index(begin) + len(begin) : text.index(end)]
    assert embedded == markdown_table(), "run: iothub-gateway codes --markdown, and paste it into README.md"
