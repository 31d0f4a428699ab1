"""Which mailbox node owns a user's Maildir: rendezvous hashing of the mailbox name over `mailbox.nodes`.

ARCHITECTURE.md contract 7: one owner per piece of state, found by the same ring as the queue shards
(`cluster.bus.ring.owner_index`). The key is the mailbox name (`cluster.mailbox.maildir.mailbox_name`: the
lower-cased local part), so the LMTP recipient "Alice@example.org" and the POP3 logins "alice@example.org" and
"alice" all find the same node. Adding a node moves about 1/N of the mailboxes (see OPERATIONS.md).

Input: a local part or login name and the node list. Output: the node index, or `MailboxNameError` (from
`mailbox_name`) for a name that cannot be a mailbox.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.bus.ring import owner_index
from cluster.mailbox.maildir import mailbox_name


def login_localpart(username: str) -> str:
    """The local part whose Maildir a user reads: "alice@example.org" and "alice" both read "alice"."""
    return username.rpartition("@")[0] if "@" in username else username


def node_for_mailbox(name: str, nodes: Sequence[str]) -> int:
    """Index in `nodes` of the node owning the mailbox `name` (a mailbox name, already normalised)."""
    return owner_index(name, len(nodes))


def node_for_localpart(localpart: str, nodes: Sequence[str]) -> int:
    """The node owning the Maildir of a recipient's local part or a login name's local part."""
    return node_for_mailbox(mailbox_name(localpart), nodes)
