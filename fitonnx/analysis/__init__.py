"""Beside the pipeline: validation against simulated quantization, comparison, inspection."""
