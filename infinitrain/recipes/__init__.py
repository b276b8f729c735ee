"""Shipped training recipes (YAML files a user can copy and edit)."""
