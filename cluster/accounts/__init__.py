"""Accounts and the checks around them: SPF, sender domains, local recipients, per-user limits, AUTH failures."""
