"""The multisig policy (network, threshold, script type, founders' keys) and the GENERATOR of
deposit and change addresses. The independent verifier (custody.verify) re-derives what this makes."""
