"""Private: core machinery of oxypy (see docs/architecture.md)."""
