"""Private: cli machinery of oxypy (see docs/architecture.md)."""
