"""Evals and the report card."""
