"""Withdrawals: the queue (request, approve, export, import, finalize, broadcast, follow), the
daily batch, and signer.py, the OFFLINE founder signer, which imports neither the store nor the chain."""
