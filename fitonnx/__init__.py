"""fitonnx: Fisher Information Trace (FIT) quantization sensitivity for any ONNX model."""

# First: refuses an environment where two distributions install the onnxruntime module.
from fitonnx import _environment  # noqa: F401
from fitonnx.analysis.compare import CompareReport, compare
from fitonnx.analysis.damage import Threshold
from fitonnx.analysis.harness import SimulationOptions
from fitonnx.analysis.inspection import Inspection, inspect_model
from fitonnx.analysis.validate import Sampler, SamplingOptions, ValidationReport, validate
from fitonnx.api import (
    AllocationOptions,
    Budget,
    BudgetKind,
    RandomData,
    RecommendResult,
    Session,
    budget_from,
    fisher_traces,
    inspect_tensors,
    open_model,
    recommend,
    score,
)
from fitonnx.errors import FitonnxError, InternalError
from fitonnx.export import export_recommendation
from fitonnx.fisher.losses import FisherMode, Likelihood
from fitonnx.fisher.options import FisherOptions
from fitonnx.model.data import Dataset, load_data, load_npz
from fitonnx.model.graph import Kind, QuantTensor, find_quantizable
from fitonnx.scale import Workers
from fitonnx.score.fit import ScoreReport, TensorScore

__version__ = "0.1.0"

__all__ = [
    "AllocationOptions",
    "Budget",
    "BudgetKind",
    "CompareReport",
    "Dataset",
    "FisherMode",
    "FisherOptions",
    "FitonnxError",
    "Inspection",
    "InternalError",
    "Kind",
    "Likelihood",
    "QuantTensor",
    "RandomData",
    "RecommendResult",
    "Sampler",
    "SamplingOptions",
    "ScoreReport",
    "Session",
    "SimulationOptions",
    "TensorScore",
    "Threshold",
    "ValidationReport",
    "Workers",
    "budget_from",
    "compare",
    "export_recommendation",
    "find_quantizable",
    "fisher_traces",
    "inspect_model",
    "inspect_tensors",
    "load_data",
    "load_npz",
    "open_model",
    "recommend",
    "score",
    "validate",
]
