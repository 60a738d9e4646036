"""Private: tunnel machinery of oxypy (see docs/architecture.md)."""
