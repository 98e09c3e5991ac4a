"""The books: the double-entry ledger, deposits credited from the chain, audits of the ledger and
of reserves against liabilities, and the Merkle sum tree of liabilities."""
