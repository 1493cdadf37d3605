"""`seqgen serve`: models over HTTP — app.py (routes, validation, the page), batcher.py (request batching),
models.py (the served models and the task calls), config.py (limits), static/ (the web page)."""
