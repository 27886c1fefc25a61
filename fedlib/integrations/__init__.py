"""Integrations with orchestrators; the only place that imports them."""
