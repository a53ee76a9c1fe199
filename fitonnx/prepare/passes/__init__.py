"""Passes of the prepare stage: each returns a new model and says what it changed."""
