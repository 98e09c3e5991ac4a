"""The store format this tool writes (custody.store.models re-exports it; the light reader,
custody.store.light, reads it without importing the models)."""

SCHEMA_VERSION = 5
