"""SDXL: configs, key maps, loading and writing checkpoints, text encoding, the training loss, the trainer hooks, generation."""
