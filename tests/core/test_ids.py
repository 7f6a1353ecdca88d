"""Endpoint.parse takes client text (``from=``, a hello's address): it returns an Endpoint or raises
InvalidAddress, never anything else, and accepts only ASCII digits."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.core.ids import MAX_ADDRESS_CHARS, Endpoint, InvalidAddress, node_id_from_ipv4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.2.3:3000", Endpoint("10.0.2.3", 3000)),
        ("http://10.0.2.3:1", Endpoint("10.0.2.3", 1)),
        ("255.255.255.255:65535", Endpoint("255.255.255.255", 65535)),
    ],
)
def test_valid_addresses(text, expected):
    assert Endpoint.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4:\u00b2",  # superscript two: str.isdigit() is True, int() raises
        "1.2.3.4:\u0663\u0660\u0660\u0660",  # Arabic-Indic 3000: int() would accept it
        "1.2.3.4:\uff13\uff10\uff10\uff10",  # full-width 3000
        "1.2.3.4:" + "9" * 5000,  # int() refuses more than 4300 digits with its own ValueError
        "1.2.3.4:" + "0" * 40 + "80",
        "1.2.3.\u0664:3000",
        "\u0661.2.3.4:3000",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:-1",
        "1.2.3.4:+80",
        "1.2.3.4: 80",
        "1.2.3:80",
        "1.2.3.4.5:80",
        "01.2.3.4:80",
        "1.2.3.4:",
        ":80",
        "",
        "[::1]:80",
        "host:80",
    ],
)
def test_invalid_addresses_raise_invalid_address(text):
    with pytest.raises(InvalidAddress):
        Endpoint.parse(text)


def test_error_messages_quote_at_most_a_bounded_prefix():
    with pytest.raises(InvalidAddress) as caught:
        Endpoint.parse("1.2.3.4:" + "9" * 5000)
    assert len(str(caught.value)) < 4 * MAX_ADDRESS_CHARS


@given(st.text(max_size=80))
def test_parse_of_any_text_returns_an_endpoint_or_raises_invalid_address(text):
    try:
        endpoint = Endpoint.parse(text)
    except InvalidAddress:
        return
    assert text.isascii()
    assert 1 <= endpoint.port <= 65535
    assert Endpoint.parse(str(endpoint)) == endpoint


@given(
    st.lists(
        st.one_of(st.integers(0, 300).map(str), st.sampled_from(["\u00b2", "\u0663", "", "x"])), max_size=5
    ),
    st.one_of(st.integers(-5, 70000).map(str), st.text(st.characters(categories=["Nd", "No"]), max_size=6)),
)
def test_near_valid_addresses_return_an_endpoint_or_raise_invalid_address(octets, port):
    text = ".".join(octets) + ":" + port
    try:
        endpoint = Endpoint.parse(text)
    except InvalidAddress:
        return
    assert endpoint.host.count(".") == 3 and str(endpoint.port) == port


@given(st.text(max_size=40))
def test_node_id_of_any_text_is_an_id_or_invalid_address(text):
    try:
        assert 0 <= node_id_from_ipv4(text) <= 65535
    except InvalidAddress:
        pass


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_cached_node_id_equals_the_parsed_one(address, port):
    """Endpoint.node_id is cached per host: it must give what parsing gives, every time."""
    endpoint = Endpoint(str(address), port)
    assert endpoint.node_id == node_id_from_ipv4(str(address)) == address.packed[2] * 256 + address.packed[3]
    assert endpoint.node_id == endpoint.node_id


@given(st.text(max_size=20))
def test_cached_node_id_never_caches_a_failure(host):
    """A host that is not an address raises each time (a failure is not remembered as an ID)."""
    try:
        expected = node_id_from_ipv4(host)
    except InvalidAddress:
        for _ in range(2):
            with pytest.raises(InvalidAddress):
                Endpoint(host, 80).node_id  # noqa: B018
    else:
        assert Endpoint(host, 80).node_id == expected
