"""``python -m fitonnx``: the same command line as ``fitonnx``."""

from fitonnx.cli.main import main

if __name__ == "__main__":
    main()
