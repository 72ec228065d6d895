"""Integrations with other libraries: drop-in functions and patch() / unpatch() helpers (one module per library)."""
