"""Private: balance machinery of oxypy (see docs/architecture.md)."""
