"""Who signs what: founders' and employees' key files, employee keys on a PKCS#11 token,
signed statements, and approvals bound to one exact transaction."""
