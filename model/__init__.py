"""Bora model core."""
