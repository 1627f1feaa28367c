"""Reusable layers for implicit models."""
