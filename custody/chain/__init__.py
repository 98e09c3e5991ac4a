"""Chains: the interface (types.py), the JSON-RPC node backend (node.py), the embedded regtest chain on
libbitcoinkernel (embedded.py), the consensus check before broadcast, and the choice between them (backend.py)."""
