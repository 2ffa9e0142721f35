"""Keeping models: the DuckDB catalog, the vector stores, exact search, hubs, and the Registry facade."""

from registry.registry import Registry

__all__ = ["Registry"]
