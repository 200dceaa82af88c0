"""Kiln: a staged compilation pipeline for LLM inference."""

__version__ = "0.1.0"
