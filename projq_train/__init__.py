"""projq-train: low-bit LLM fine-tuning with ProjQ-initialized adapters."""

__version__ = "0.1.0"
