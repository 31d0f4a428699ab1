"""The frontends' TLS server context for STARTTLS (RFC 3207), built once per process.

Input: `smtp.tls_cert_file` / `smtp.tls_key_file` (PEM). Output: an `ssl.SSLContext` accepting TLS 1.2 and
newer with the `ssl` module's default (secure) cipher choice, or None when TLS is not configured.
Failure modes: a missing, unreadable or mismatched certificate or key raises `ConfigError` naming the key,
so `mtacluster serve frontend` (and `mtacluster config check`) end with one clear line instead of offering a
STARTTLS that cannot work.
"""

from __future__ import annotations

import ssl

from cluster.config import ConfigError, SmtpConfig, check_readable


def server_context(smtp: SmtpConfig) -> ssl.SSLContext | None:
    if not smtp.tls_cert_file:
        return None
    check_readable("smtp.tls_cert_file", smtp.tls_cert_file)
    check_readable("smtp.tls_key_file", smtp.tls_key_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Mail clients do not present certificates and we do not ask for one.
    context.verify_mode = ssl.CERT_NONE
    try:
        context.load_cert_chain(smtp.tls_cert_file, smtp.tls_key_file)
    except ssl.SSLError as exc:
        raise ConfigError("smtp.tls_key_file", f"cannot use {smtp.tls_cert_file} with {smtp.tls_key_file}: "
                          f"{exc.reason or exc}") from None
    return context
