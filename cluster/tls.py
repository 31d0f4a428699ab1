"""TLS server contexts for STARTTLS (SMTP, RFC 3207) and STLS (POP3, RFC 2595), built once per process.

Input: a PEM certificate chain and key file, and the configuration section they come from ("smtp", "pop3"),
so errors name the right keys. Output: an `ssl.SSLContext` accepting TLS 1.2 and newer with the `ssl`
module's default (secure) cipher choice, or None when no certificate is configured.
Failure modes: a missing, unreadable or mismatched certificate or key raises `ConfigError` naming the key,
so `mtacluster serve ROLE` and `mtacluster config check` end with one clear line instead of offering a TLS
upgrade that cannot work.
"""

from __future__ import annotations

import ssl

from cluster.config import ConfigError, check_readable


def server_context(cert_file: str, key_file: str, section: str) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    check_readable(f"{section}.tls_cert_file", cert_file)
    check_readable(f"{section}.tls_key_file", key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mail clients do not present certificates and we do not ask for one.
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"{section}.tls_key_file", f"cannot use {cert_file} with {key_file}: "
                          f"{exc.reason or exc}") from None
    return context
