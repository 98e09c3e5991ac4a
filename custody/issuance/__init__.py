"""Deposit and change addresses: allocated under a lock, verified independently, stored; and the
verification runs over everything issued."""
