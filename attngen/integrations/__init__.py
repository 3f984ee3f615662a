"""Integrations of attngen with other libraries: `attngen.integrations.transformers` (Hugging Face transformers)."""
