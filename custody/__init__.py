"""custody: multisig custody and withdrawal approval for an exchange's cold storage.

The library never prints, prompts or exits; ``custody_cli`` is the only place that speaks.
"""

__version__ = "0.1.0"
