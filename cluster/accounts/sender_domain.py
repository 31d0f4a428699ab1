"""smtp.reject_unknown_sender_domain: does the MAIL FROM domain exist as a mail domain? (Postfix's
reject_unknown_sender_domain.)

Input: the sender's domain and an `MxResolver` (cluster.delivery.mx: dnspython's asyncio resolver on [dns], or
a static one in tests). Output: None when the domain has an MX, A or AAAA record, else the refusal:
- a null MX (RFC 7505 4.2): 550 5.7.27;
- no MX and no address (NXDOMAIN, or the name exists without them): 550 5.1.8;
- a temporary DNS failure (SERVFAIL, timeout) that leaves the question open: 450 4.1.8 (the client retries).
Address literals ("[192.0.2.1]") are not looked up.
"""

from __future__ import annotations

from cluster.delivery.mx import NXDOMAIN, OK, TEMPORARY, MxResolver, ip_literal
from cluster.smtp import replies
from cluster.smtp.replies import Reply


async def check_sender_domain(resolver: MxResolver, domain: str) -> Reply | None:
    domain = domain.lower().rstrip(".")
    if not domain or ip_literal(domain) is not None:
        return None
    mx = await resolver.mx(domain)
    if mx.status == OK:
        hosts = [host for _, host in mx.records if host not in ("", ".")]
        if hosts:
            return None
        if mx.records:
            return replies.null_mx_sender_domain(domain)
    if mx.status == NXDOMAIN:
        return replies.unknown_sender_domain(domain)
    found = await resolver.addresses(domain)
    if found.addresses:
        return None
    if mx.status in TEMPORARY or found.status in TEMPORARY:
        return replies.SENDER_DOMAIN_TEMPFAIL
    return replies.unknown_sender_domain(domain)
