"""Private: the status page's collector and HTML (see docs/architecture.md)."""
