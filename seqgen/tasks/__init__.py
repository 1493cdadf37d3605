"""Task wiring: each task = its data loader + its encoder, plugged into the shared model, trainer and search."""
