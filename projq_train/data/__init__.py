"""Prompt templates and datasets."""
