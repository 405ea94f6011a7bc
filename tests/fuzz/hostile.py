"""Hostile values shared by the fuzz tests: objects whose methods raise, endless iterables, huge numbers.

Each is something a buggy peer library or a malicious upstream can hand a translator; the contract is
that the translator answers (an error with a catalog code, None, or its documented ValueError/TypeError)
and never runs the hostile object's own methods long enough to hang.
"""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import strategies as st

from gateway.codes import CATALOG
from gateway.errors import IoTHubError


class Boom(Exception):
    """Raised by every hostile method; a test that sees it escape has found a crash."""


def _boom(*_args: object, **_kwargs: object) -> Any:
    raise Boom("hostile method called")


class HostileStr(str):
    """A str whose own methods all raise (its characters are fine)."""

    __len__ = __getitem__ = __iter__ = __contains__ = __eq__ = __ne__ = __str__ = __repr__ = _boom
    lower = upper = strip = lstrip = rstrip = split = partition = startswith = endswith = find = _boom
    encode = isdigit = isascii = isalnum = isspace = casefold = replace = decode = _boom
    __hash__ = str.__hash__  # dict keys must still hash; everything else raises


class HostileBytes(bytes):
    __len__ = __getitem__ = __iter__ = __eq__ = __bytes__ = __str__ = __repr__ = decode = _boom
    __hash__ = bytes.__hash__


class HostileInt(int):
    __int__ = __index__ = __eq__ = __lt__ = __le__ = __gt__ = __ge__ = __str__ = __repr__ = __format__ = _boom
    __hash__ = int.__hash__


class Counting:
    """An endless iterable that counts how many items were pulled (the bound on work per call)."""

    def __init__(self, item: object = None) -> None:
        self.item = item
        self.pulled = 0

    def __iter__(self) -> Iterator[object]:
        for _ in itertools.count():
            self.pulled += 1
            yield self.item


class Unprintable:
    def __repr__(self) -> str:
        raise Boom("repr")

    __str__ = __repr__


HUGE_INTS = (10**5000, -(10**5000), 2**70000)

# Built, not sampled: hypothesis reprs a sampled_from strategy's elements, and these cannot be repr'd.
hostile_scalars = st.one_of(
    st.builds(HostileStr, st.sampled_from(["0501", "amqp:link:stolen", "429001", "status-code", "ErrorCode:429001"])),
    st.builds(HostileBytes, st.sampled_from([b"0501", b"429001"])),
    st.builds(HostileInt, st.sampled_from([5, 429, 429001, 10**30])),
    st.builds(Unprintable),
    st.sampled_from(range(len(HUGE_INTS))).map(HUGE_INTS.__getitem__),
    st.sampled_from(
        [float("nan"), float("inf"), "\udcff", "x" * 100_000, b"\xff" * 1000, None, True, (None,) * 100]
    ),
)

plain_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40), st.binary(max_size=40)
)

#: Scalars a fuzz test mixes into structures: mostly ordinary values, sometimes hostile ones.
scalars = st.one_of(plain_scalars, hostile_scalars)

json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def assert_coded(result: object) -> None:
    """The documented success shape: None or an IoTHubError whose code the catalog lists (or its family)."""
    if result is None:
        return
    assert isinstance(result, IoTHubError), type(result)
    assert 300_000 <= result.code <= 599_999
    assert result.code in CATALOG or result.code % 1000 == 0, result.code
    assert result.exact is False or result.info.known
    result.to_dict()  # JSON-ready whatever the input held
    str(result)


def peak_memory(call: Callable[[], object]) -> int:
    """Bytes allocated at the peak while ``call`` runs (its result included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
