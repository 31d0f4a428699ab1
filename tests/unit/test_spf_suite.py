"""The OpenSPF RFC 7208 test suite (tests/data/spf/rfc7208-tests.yml, from the pyspf source distribution, under
the license in rfc7208-tests.LICENSE beside it) run against what the frontends use: `SpfChecker`.

Each scenario's zone data is served by a lookup built here from the suite's rules: SPF-type entries also stand
as TXT records unless the name lists TXT itself ("TXT: NONE" lists none); "TIMEOUT" makes queries for types
the name has no records of time out; names that are not listed do not exist, except names under "error."
which time out; a CNAME is answered with its target's records of the asked type (one level).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import spf
import yaml

from cluster.accounts.spf import SpfChecker

SUITE = Path(__file__).resolve().parent.parent / "data" / "spf" / "rfc7208-tests.yml"


class ZoneLookup:
    def __init__(self, zonedata: dict[str, list[Any]]) -> None:
        self.records: dict[str, list[tuple[str, Any]]] = {}
        self.timeouts: set[str] = set()
        for name, entries in zonedata.items():
            key = name.lower().rstrip(".")
            records: list[tuple[str, Any]] = []
            spf_values: list[Any] = []
            lists_txt = False
            for entry in entries:
                if entry == "TIMEOUT":
                    self.timeouts.add(key)
                    continue
                for kind, value in entry.items():
                    if kind == "SPF":
                        spf_values.append(value)
                    elif kind == "TXT":
                        lists_txt = True
                        if value != "NONE":
                            records.append(("TXT", value))
                    else:
                        records.append((kind, value))
            if not lists_txt:
                records.extend(("TXT", value) for value in spf_values if value != "NONE")
            self.records[key] = records

    def __call__(self, name: str, qtype: str, follow: bool = True) -> list[tuple[tuple[str, str], Any]]:
        key = name.lower().rstrip(".")
        if key not in self.records and key not in self.timeouts:
            if key.startswith("error."):
                raise spf.TempError("DNS timeout")
            return []
        found: list[tuple[tuple[str, str], Any]] = []
        for kind, value in self.records.get(key, []):
            if kind == qtype:
                found.append(((key, kind), _wire(kind, value)))
            elif kind == "CNAME" and qtype != "CNAME":
                target = str(value).rstrip(".")
                found.append(((key, "CNAME"), target))
                if follow:  # one level, as a resolver's answer carries it; pyspf follows longer chains itself
                    found.extend(self(target, qtype, follow=False))
        if not found and key in self.timeouts:
            raise spf.TempError("DNS timeout")
        return found


def _wire(kind: str, value: Any) -> Any:
    """The value as `cluster.accounts.spf.DnsLookup` gives it for a real answer."""
    if kind == "TXT":
        strings = [value] if isinstance(value, str) else value
        return tuple(s.encode("utf-8") for s in strings)
    if kind == "MX":
        return (int(value[0]), str(value[1]).rstrip("."))
    return str(value)


def _cases() -> list[Any]:
    cases = []
    with SUITE.open("rb") as f:
        for scenario in yaml.safe_load_all(f):
            for name, test in scenario["tests"].items():
                cases.append(pytest.param(scenario["zonedata"], test, id=name))
    return cases


CASES = _cases()


def test_the_suite_is_complete() -> None:
    assert len(CASES) >= 200  # the 2014.04 release has a few more than 200 tests


@pytest.mark.parametrize(("zonedata", "test"), CASES)
def test_rfc7208(zonedata: dict[str, list[Any]], test: dict[str, Any]) -> None:
    checker = SpfChecker(ZoneLookup(zonedata), receiver="receiver.test", timeout=20, threads=1,
                         default_explanation="DEFAULT")
    try:
        verdict = checker.check_blocking(test["host"], test["mailfrom"], test["helo"])
    finally:
        checker.close()
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert verdict.result in expected, f"{test.get('description', '')} (RFC 7208 {test.get('spec')})"
    if "explanation" in test:
        assert verdict.explanation == test["explanation"]
