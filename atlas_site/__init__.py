"""Renders an atlas into an mkdocs-material project and builds the static site."""
