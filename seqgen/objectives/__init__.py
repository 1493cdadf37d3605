"""Training objectives other than cross-entropy, handed by a task to the Trainer (scst.py: self-critical captioning)."""
