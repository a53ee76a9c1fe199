"""The ``fitonnx`` command line: one module per subcommand over the public API."""
