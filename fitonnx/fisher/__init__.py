"""Stage 3, the Fisher: loss heads, the gradient model, and the engines that run it per sample."""
