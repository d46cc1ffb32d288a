"""Compiled extensions, built from the Cython sources in the top-level ``_native/`` directory."""
