"""The database: SQLModel tables, the engine and its transactions, schema set-up and upgrades."""
