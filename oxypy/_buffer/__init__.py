"""Private: buffer machinery of oxypy (see docs/architecture.md)."""
