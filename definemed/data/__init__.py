"""Bundled German sample data and loaders for the real datasets."""
