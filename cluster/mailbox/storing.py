"""One recipient's copy of an LMTP message into its Maildir, with the quota check: the reply LMTP sends for it.

`store_for_recipient(store, quota_of, localpart, sender, data)` (blocking: run it in a thread) returns
(`Reply`, outcome label for mtacluster_lmtp_deliveries_total, file name or ""):
- 250 2.0.0 only after tmp/ file written, fsynced, renamed into new/, and new/ fsynced (`MaildirStore.deliver`);
- 552 5.2.2 when the stored message alone is larger than the mailbox's quota (it can never fit);
- 452 4.2.2 when it would take the mailbox over its quota now, or the file system is full (ENOSPC, EDQUOT);
- 451 4.3.0 for any other write error (permissions, I/O error): the worker retries later;
- 550 5.1.3 when the local part cannot name a mailbox.
Failure modes: none raised; a failed write leaves no file behind (`MaildirStore.deliver` removes it).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from cluster.mailbox import metrics
from cluster.mailbox.maildir import MailboxNameError, MaildirStore, mailbox_name, with_return_path
from cluster.mailbox.quota import Verdict, maildir_usage, verdict
from cluster.smtp import replies
from cluster.smtp.replies import Reply

log = logging.getLogger(__name__)

# Errors that mean "no room now" rather than "broken": the sender may try again later (RFC 3463 X.2.2).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def store_for_recipient(store: MaildirStore, quota_of: Callable[[str], int], localpart: str, sender: str,
                        data: bytes) -> tuple[Reply, str, str]:
    try:
        mailbox = mailbox_name(localpart)
    except MailboxNameError:
        return replies.BAD_MAILBOX_NAME, "refused", ""
    quota = quota_of(mailbox)
    size = len(with_return_path(sender, data))
    used = 0
    if quota > 0:
        _, used = maildir_usage(store.root / mailbox)
    decision = verdict(quota, used, size)
    if decision is Verdict.NEVER_FITS:
        return replies.MESSAGE_EXCEEDS_QUOTA, "too_big", ""
    if decision is Verdict.OVER_QUOTA:
        return replies.MAILBOX_OVER_QUOTA, "over_quota", ""
    try:
        path = store.deliver(mailbox, sender, data)
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            return replies.MAILBOX_DISK_FULL, "disk_full", ""
        log.warning("maildir write for mailbox=%s failed: %s", mailbox, exc.strerror or exc)
        return replies.MAILBOX_WRITE_FAILED, "error", ""
    if quota > 0:
        metrics.QUOTA_USAGE.observe((used + size) / quota)
        metrics.MAILBOX_SIZE.observe(used + size)
    else:
        metrics.MAILBOX_SIZE.observe(maildir_usage(store.root / mailbox)[1])
    return replies.lmtp_delivered(path.name), "delivered", path.name
