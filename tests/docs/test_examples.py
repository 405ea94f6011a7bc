"""Every code block in README.md and docs/ runs (or parses) as written: see runner.py for the rules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs import runner

BLOCKS = runner.collect()
MAX_NOT_RUN = 10  #: blocks that cannot run as written (a cloud hub, the whole test suite): keep them few


class PageSidecars:
    """One sidecar per page that asks for it, started before its first block and stopped at the next page."""

    def __init__(self, sandbox: runner.Sandbox) -> None:
        self.sandbox = sandbox
        self.page: Path | None = None
        self.port = 0
        self.stack = contextlib.ExitStack()

    def port_for(self, page: Path) -> int:
        if page != self.page:
            self.stack.close()
            self.page = None
            self.port = self.stack.enter_context(runner.sidecar(self.sandbox))
            self.page = page
        return self.port

    def close(self) -> None:
        self.stack.close()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[runner.Sandbox]:
    box = runner.Sandbox()
    yield box
    box.close()


@pytest.fixture(scope="module")
def sidecars(sandbox: runner.Sandbox) -> Iterator[PageSidecars]:
    pages = PageSidecars(sandbox)
    yield pages
    pages.close()


RUNNABLE = [b for b in BLOCKS if b.lang not in runner.PROSE and b.not_run is None]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block(block: runner.Block, sandbox: runner.Sandbox, sidecars: PageSidecars) -> None:
    if block.needs_sidecar and block.lang in runner.SHELL | runner.CONSOLE:
        block = runner.pointed_at(block, sidecars.port_for(block.path))
    outcome = runner.run(block, sandbox)
    assert outcome.ok, f"{block.id}: {outcome.detail}"


def test_every_block_has_a_known_language() -> None:
    unknown = [b.id for b in BLOCKS if b.lang not in runner.KNOWN]
    assert not unknown, f"blocks in a language the runner does not know: {unknown}"


def test_few_blocks_are_not_run() -> None:
    skipped = [f"{b.id} ({b.not_run})" for b in BLOCKS if b.not_run is not None]
    assert len(skipped) <= MAX_NOT_RUN, "too many not-run blocks:\n" + "\n".join(skipped)


def test_the_docs_have_examples_of_each_kind() -> None:
    """A collector that silently found nothing would pass everything."""
    kinds = {b.lang for b in RUNNABLE}
    assert {"python", "console", "toml"} <= kinds, kinds
    assert len(RUNNABLE) >= 20
