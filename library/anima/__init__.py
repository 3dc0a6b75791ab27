"""Anima: the DiT, loading the released files, text encoding, sampling, the trainer hooks."""
