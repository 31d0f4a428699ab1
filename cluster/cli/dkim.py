"""`mtacluster dkim keygen DOMAIN --selector S [--algorithm rsa|ed25519] [--bits 2048] --out FILE`.

Writes a new private key to FILE (PKCS#8 PEM, mode 0600; an existing file is never overwritten) and prints the
DNS TXT record to publish, in zone-file form, on stdout; the configuration lines to add go to stderr.
Failure modes: an existing or unwritable FILE, a bad domain or selector, or too few bits: one line on stderr,
exit code 1 (2 for bad arguments, from argparse).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from cluster.dkim.keys import DEFAULT_RSA_BITS, MIN_RSA_BITS, algorithm_name, dns_record, generate, txt_strings
from cluster.dkim.keys import write_private_key as write_key

_LABELS = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*")


def register(commands: Any) -> None:
    """Add the `dkim` command group to the top-level subparsers."""
    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", required=True, metavar="COMMAND")
    keygen = dkim_commands.add_parser("keygen", help="make a signing key and print its DNS TXT record")
    keygen.add_argument("domain", help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=): the record goes at "
                        "SELECTOR._domainkey.DOMAIN")
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=DEFAULT_RSA_BITS, help="RSA key size (default 2048)")
    keygen.add_argument("--out", required=True, help="where to write the private key (must not exist)")
    dkim.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    domain = args.domain.strip().rstrip(".").lower()
    for what, value in (("domain", domain), ("selector", args.selector)):
        if not _LABELS.fullmatch(value):
            print(f"mtacluster dkim keygen: {value!r} is not a valid {what}", file=sys.stderr)
            return 1
    algorithm = algorithm_name(args.algorithm)
    if algorithm == "rsa-sha256" and args.bits < MIN_RSA_BITS:
        print(f"mtacluster dkim keygen: RSA keys need at least {MIN_RSA_BITS} bits (RFC 8301 3.2)", file=sys.stderr)
        return 1
    key = generate(algorithm, args.bits)
    try:
        write_key(args.out, key)
    except OSError as exc:
        print(f"mtacluster dkim keygen: {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    strings = " ".join(f'"{s}"' for s in txt_strings(dns_record(key)))
    print(f"{args.selector}._domainkey.{domain}. IN TXT ( {strings} )")
    print(f"{args.out}: new {algorithm} key (mode 0600); publish the record above, then configure:\n"
          f'  [dkim.domains."{domain}"]\n  selector = "{args.selector}"\n  key_file = "{args.out}"\n'
          f'  algorithm = "{algorithm}"', file=sys.stderr)
    return 0
