"""fitonnx: Fisher Information Trace (FIT) quantization sensitivity for any ONNX model."""

from fitonnx.api import Session, fisher_traces, inspect_tensors, open_model, score
from fitonnx.data import Dataset, load_data, load_npz
from fitonnx.errors import FitonnxError, InternalError
from fitonnx.graph import Kind, QuantTensor, find_quantizable
from fitonnx.losses import FisherMode, Likelihood
from fitonnx.score import ScoreReport, TensorScore

__version__ = "0.1.0"

__all__ = [
    "Dataset",
    "FisherMode",
    "FitonnxError",
    "InternalError",
    "Kind",
    "Likelihood",
    "QuantTensor",
    "ScoreReport",
    "Session",
    "TensorScore",
    "find_quantizable",
    "fisher_traces",
    "inspect_tensors",
    "load_data",
    "load_npz",
    "open_model",
    "score",
]
