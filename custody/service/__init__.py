"""The HTTP service: the API for the exchange, metrics and the status page (`custody serve`)."""
