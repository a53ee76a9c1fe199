"""Files fitonnx reads and writes, safely: atomic writes and bounded reads."""
