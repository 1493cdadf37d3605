"""Data: reading user files, corpora, batching."""
