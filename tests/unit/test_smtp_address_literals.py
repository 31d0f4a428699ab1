"""Address literals (RFC 5321 4.1.3) at their edges: General-address-literal content is printable US-ASCII
from "!" to "~" except "[", "\\" and "]", may itself hold colons, and a one-character literal is judged as an
IPv4 address. Closes gaps mutation testing found in `cluster.smtp.address`."""

from __future__ import annotations

import pytest

from cluster.smtp.address import Address, AddressError, parse_forward_path


@pytest.mark.parametrize("literal", ["[x-tag:a:b]", "[tag:!]", "[tag:~]", "[tag:!az~]"])
def test_general_literals_that_are_valid(literal: str) -> None:
    assert parse_forward_path(f"<user@{literal}>") == Address("user", literal)


@pytest.mark.parametrize(("literal", "problem"), [
    ("[tag:a\x7f]", "invalid address literal"),  # DEL is not printable
    ("[tag:a\\b]", "invalid address literal"),
    ("[tag:a[b]", "invalid address literal"),
    ("[tag:\x1f]", "invalid address literal"),
    ("[x]", "invalid IPv4 address literal"),
    ("[-tag:a]", "invalid address literal"),
])
def test_literals_that_are_refused(literal: str, problem: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_forward_path(f"<user@{literal}>")
    assert problem in caught.value.reply.text
