"""Private: server machinery of oxypy (see docs/architecture.md)."""
