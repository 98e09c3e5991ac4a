"""Withdrawals, one module a step: ``states`` (the state machine), ``limits`` (fee caps, depths),
``records`` (a withdrawal's stored state, judged by approvals and the rulebook), ``queue`` (request,
approve, cancel, list), ``psbt_io`` (export, import, finalize), ``broadcast`` (broadcast and follow on
the chain), ``batch`` (the daily batch), and ``signer``, the OFFLINE founder signer, which imports
neither the store nor the chain."""
