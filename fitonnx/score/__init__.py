"""Stage 4, the score: noise models and FIT per tensor and format, with ranking statistics."""
