"""Calibration data built from what a user has: image folders, WAV files, text lines, a loader script.

Each builder reads the files, shapes them after the model's inputs (``InputSpec``) and returns a
``Built``: the ``Dataset`` and what went into it, for the preview ``fitonnx data`` prints.
"""
