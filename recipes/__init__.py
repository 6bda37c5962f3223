"""Shipped recipes. This folder installs as the package `clipa.recipes` (see pyproject.toml)."""
