"""Stage 1, the model: safe loading, calibration data, and the graph view of quantizable tensors."""
