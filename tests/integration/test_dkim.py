"""DKIM end to end: mail relayed through a real cluster leaves signed, and two independent verifiers (dkimpy and
Perl's Mail::DKIM, the latter for RSA only) accept the signatures against the keys published in a real DNS
server (dnsmasq)."""

from __future__ import annotations

import smtplib
import subprocess
from email.message import EmailMessage
from pathlib import Path

import dkim
import dns.resolver
import pytest

from cluster.dkim.keys import dns_record, generate, txt_strings, write_private_key
from tests.support.harness import Cluster, DnsServer, SinkMessage, SmtpSink, running
from tests.support.tooling import require_tool

pytestmark = pytest.mark.integration

# Mail::DKIM with its resolver pointed at the test DNS server; prints one line per signature, then the result.
VERIFY_PERL = r"""
use strict; use Mail::DKIM::Verifier; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0]));
my $dkim = Mail::DKIM::Verifier->new();
local $/; my $text = <STDIN>; $text =~ s/\r?\n/\r\n/g;
$dkim->PRINT($text); $dkim->CLOSE;
print $_->domain, " ", $_->algorithm, " ", $_->result, "\n" for $dkim->signatures;
print "result ", $dkim->result, "\n";
"""


def _message(sender: str, recipient: str, subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"Sender <{sender}>"
    message["To"] = recipient
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@dkim.test>"
    message.set_content(f"{subject}\n\nwith  trailing spaces   \nand a last line\n")
    return message


def _wire_bytes(message: SinkMessage) -> bytes:
    """The message as the sink received it (the sink's own Received header dropped), CRLF line ends."""
    return message.text.encode("latin-1").replace(b"\n", b"\r\n")


def test_relayed_mail_is_signed_and_verifies_in_two_verifiers(tmp_path: Path) -> None:
    perl = require_tool("perl")
    rsa_key, ed_key = generate("rsa-sha256"), generate("ed25519-sha256")
    write_private_key(str(tmp_path / "signer.pem"), rsa_key)
    write_private_key(str(tmp_path / "operator.pem"), ed_key)
    txt = {"s1._domainkey.signer.test": txt_strings(dns_record(rsa_key)),
           "e1._domainkey.operator.test": txt_strings(dns_record(ed_key))}
    with running(DnsServer([], {}, txt)) as dns_server, running(SmtpSink()) as sink:
        cluster = Cluster(tmp_path / "c", overrides={
            # Only 127.0.0.2 relays: a message from 127.0.0.1 to a local domain is inbound mail, not ours to sign.
            # The inbound sender's domain exists nowhere: the port-25 sender checks (test_accounts_e2e.py) are off.
            "smtp": {"relay_networks": ["127.0.0.2/32"], "reject_unknown_sender_domain": False, "spf": "off"},
            "delivery": {"transports": {"example.net": f"smtp:[127.0.0.1]:{sink.port}",
                                        "local.test": f"smtp:[127.0.0.1]:{sink.port}"}},
            "dkim": {"domains": {
                "signer.test": {"selector": "s1", "key_file": str(tmp_path / "signer.pem")},
                "*": {"selector": "e1", "key_file": str(tmp_path / "operator.pem"), "algorithm": "ed25519-sha256",
                      "domain": "operator.test"}}},
        })
        with running(cluster):
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, source_address=("127.0.0.2", 0), timeout=10) as c:
                c.send_message(_message("alice@signer.test", "bob@example.net", "own key"))
                c.send_message(_message("carol@customer.test", "bob@example.net", "operator key"))
            with smtplib.SMTP("127.0.0.1", cluster.smtp_port, timeout=10) as c:
                c.send_message(_message("dave@signer.test", "eve@local.test", "inbound"))
            messages = {m.text.split("Subject: ", 1)[1].split("\n", 1)[0]: m for m in sink.wait_for_messages(3)}
            assert "dkim=signed" in "".join(p.log() for p in cluster.processes if p.role == "frontend")

        assert "DKIM-Signature" not in messages["inbound"].text
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], dns_server.port

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
            answer = resolver.resolve(name.decode(), "TXT")
            return b"".join(b"".join(record.strings) for record in answer)

        for subject, domain, algorithm in (("own key", "signer.test", "rsa-sha256"),
                                           ("operator key", "operator.test", "ed25519-sha256")):
            wire = _wire_bytes(messages[subject])
            assert wire.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
            assert f"d={domain};".encode() in wire
            assert dkim.verify(wire, dnsfunc=dnsfunc), subject
            if algorithm == "ed25519-sha256":
                continue  # Debian 12's Mail::DKIM (1.20230212) predates its ed25519 support: dkimpy only
            checked = subprocess.run([perl, "-e", VERIFY_PERL, str(dns_server.port)], input=wire,
                                     capture_output=True, timeout=30, check=True).stdout.decode()
            assert f"{domain} {algorithm} pass" in checked and "result pass" in checked, checked
            # The same verifier refuses a message changed in transit: the check is real.
            tampered = wire.replace(b"and a last line", b"and another line")
            assert not dkim.verify(tampered, dnsfunc=dnsfunc)
            failed = subprocess.run([perl, "-e", VERIFY_PERL, str(dns_server.port)], input=tampered,
                                    capture_output=True, timeout=30, check=True).stdout.decode()
            assert "result fail" in failed, failed
