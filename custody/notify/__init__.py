"""Notifications derived from the audit log (the outbox): PGP/MIME mail and HMAC-signed webhooks."""
