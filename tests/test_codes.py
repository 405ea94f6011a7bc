"""The catalog: completeness against IoT Hub's own list, one name per code, families, validation."""

from __future__ import annotations

import collections
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import codes
from gateway.codes import Action, family, lookup, parse_code
from tests.peers import missing_peer

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "iothub-codes.tsv"

# The IoT Hub common error table (the seed of this project), with the N/A-HTTP codes marked.
COMMON_TABLE = {
    400004: 400, 400027: None, 400103: 400, 401002: 401, 401003: 401, 403002: 403, 403004: 403,
    403006: 403, 403010: 403, 404001: 404, 404103: 404, 404104: 404, 409001: 409, 409002: None,
    412001: 412, 412002: None, 413001: 413, 429001: 429, 500001: 500, 503003: 503, 503008: 503,
    504101: 504,
}


def test_common_error_table_is_complete_with_http_status() -> None:
    for code, status in COMMON_TABLE.items():
        row = codes.CATALOG[code]
        assert row.http_status == status, code
        assert row.origin == "iothub"


def test_every_code_of_iothub_current_list_is_present_with_its_name() -> None:
    if not SHARED.exists():  # CI checks out beside shared/: there its absence fails, never skips
        missing_peer("shared/ not beside the checkout")
    lines = SHARED.read_text().splitlines()[1:]
    assert len(lines) > 150
    for line in lines:
        code, name, *_ = line.split("\t")
        row = codes.CATALOG[int(code)]
        assert row.name == name


def test_one_code_one_name_and_no_duplicate_names_or_aliases() -> None:
    rows = list(codes.all_codes())
    assert len({r.code for r in rows}) == len(rows)
    names = collections.Counter(n.lower() for r in rows for n in (r.name, *r.aliases))
    assert [n for n, k in names.items() if k > 1] == []
    assert codes.CATALOG[404001].name == "DeviceNotFound"
    assert codes.CATALOG[404104].name == "DeviceConnectionClosedRemotely"


def test_alias_numbers_never_shadow_a_real_code() -> None:
    for row in codes.all_codes():
        for alias in row.alias_codes:
            assert alias not in codes.CATALOG, (row.code, alias)
            assert lookup(alias) is row


def test_aliases_are_accepted_on_input() -> None:
    assert lookup(404102).name == "DeviceNotOnline"
    assert lookup(409004).name == "ModelAlreadyExists"
    assert lookup(415001).name == "IncompatibleDataType"
    assert lookup(500026).name == "ModelRepoEndpointError"
    assert codes.by_name("IoTHubUnauthorized") is codes.CATALOG[401003]
    assert codes.by_name("devicenotfound") is codes.CATALOG[404001]
    assert codes.by_name("NoSuchName") is None


def test_generic_status_codes_exist_for_iothub_and_gateway() -> None:
    for code in (400000, 429000, 499000, 502000, 504000):
        assert codes.CATALOG[code].origin == "iothub"
    for code, action in ((408000, Action.RETRY), (449000, Action.RETRY), (500000, Action.RETRY),
                         (423000, Action.RETRY), (425000, Action.RETRY), (424000, Action.FAIL),
                         (507000, Action.RETRY), (511000, Action.RETRY), (301000, Action.FAIL)):
        assert codes.CATALOG[code].origin == "gateway"
        assert codes.CATALOG[code].action is action


def test_families_resolve_unknown_codes_inexactly() -> None:
    # An unlisted code is never carried as itself: it stands for its status family's listed code.
    internal = lookup(500123)
    assert (internal.code, internal.known, internal.transient, internal.http_status) == (500000, False, True, 500)
    assert internal.name == codes.CATALOG[500000].name
    unavailable = lookup("503999")
    assert (unavailable.code, unavailable.known) == (503000, False) and unavailable.transient
    bad = lookup(400999)
    assert (bad.code, bad.known) == (400000, False) and not bad.transient
    # A status no table names (420): its synthesized family, also unlisted.
    odd = lookup(420123)
    assert (odd.code, odd.known) == (420000, False)


@given(st.integers(300_000, 599_999))
def test_every_code_lookup_returns_is_a_listed_code_or_its_family(number: int) -> None:
    info = lookup(number)
    if number in codes.CATALOG:
        assert info is codes.CATALOG[number]
    elif info.known:
        assert number in info.alias_codes  # an alias number: the canonical row
    else:
        assert info.code == number // 1000 * 1000
        assert info.code in codes.CATALOG or number // 1000 not in {c // 1000 for c in codes.CATALOG}
        assert lookup(info.code).code == info.code


class _Hostile(str):
    def strip(self, *args: object) -> str:
        raise RuntimeError("strip")

    def __len__(self) -> int:
        raise RuntimeError("len")


def test_parse_code_refuses_hostile_input_with_value_error() -> None:
    assert parse_code(_Hostile("429001")) == 429001
    for bad in (10**5000, -(10**5000), _Hostile("x" * 100), object(), 4.29e5, True):
        with pytest.raises(ValueError):
            parse_code(bad)


def test_every_status_300_599_has_a_family() -> None:
    for status in range(300, 600):
        row = family(status)
        assert row.code == status * 1000
        assert row.http_status == status


@pytest.mark.parametrize("bad", [0, 12345, 1234567, 200000, 299999, 600000, -400004, "abc", "4000o4",
                                 "", "4000040", 400004.0, None, True, b"400004"])
def test_non_codes_are_rejected_with_a_value_error_naming_the_input(bad: object) -> None:
    with pytest.raises(ValueError, match="six-digit") as info:
        lookup(bad)
    assert repr(bad) in str(info.value)


@given(st.integers() | st.text(max_size=10))
def test_lookup_returns_a_row_or_raises_value_error(value: object) -> None:
    try:
        row = lookup(value)
    except ValueError:
        return
    assert 300000 <= row.code <= 599999
    number = parse_code(value)
    # the row itself, an alias's canonical row, or (unlisted) its family's row, flagged unknown
    assert row.code == number or number in row.alias_codes or (not row.known and row.code == number // 1000 * 1000)


def test_transient_follows_the_action() -> None:
    assert codes.CATALOG[403002].transient  # resolves itself at the UTC reset
    assert not codes.CATALOG[400027].transient
    assert not codes.CATALOG[404001].transient
    assert codes.CATALOG[429001].action is Action.THROTTLE
    assert codes.CATALOG[503008].action is Action.THROTTLE
    assert codes.CATALOG[404103].action is Action.WAIT_FOR_DEVICE
    assert codes.CATALOG[401003].action is Action.REFRESH_CREDENTIALS
    for code in (401002, 404001, 403010, 403012):
        assert codes.CATALOG[code].action is Action.STOP


def test_every_row_is_consistent() -> None:
    for row in codes.all_codes():
        assert row.description and len(row.description) < 200
        assert row.transports <= {"http", "mqtt", "amqp"} and row.transports
        if row.http_status is not None:
            assert row.http_status == row.code // 1000
        assert row.to_dict()["code"] == row.code
