"""Notifications derived from the audit log (the outbox): PGP/MIME mail and HMAC-signed webhooks.

From the bottom up: ``catalog`` (which audit events are told, their names, severities and
titles), ``outbox`` (each recipient's cursor, lease, pending entries and backoff),
``recipients`` (add, remove, list), ``delivery`` (the channels, and sending what is pending
within a time budget), with ``mail`` (PGP/MIME) and ``webhook`` (HMAC-signed POSTs) below it.
"""
