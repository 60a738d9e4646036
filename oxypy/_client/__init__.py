"""Private: client machinery of oxypy (see docs/architecture.md)."""
