"""What governs custody: the hash-chained audit log, the stored policy, employees, the trading
halt and incidents."""
