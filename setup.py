import sysconfig
from pathlib import Path

from setuptools import find_packages, setup

RUNTIME = "onnxruntime>=1.20"
# Every distribution that installs the `onnxruntime` module; fitonnx runs on any of them.
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime_gpu", "onnxruntime_training", "onnxruntime_training_cpu",
                         "onnxruntime_directml", "onnxruntime_openvino", "onnxruntime_qnn", "onnxruntime_rocm")  # fmt: skip


def _installed_runtime() -> bool:
    """Whether the environment pip installs into already has a distribution providing `onnxruntime`.

    pip builds in an isolated environment, but with the target's interpreter: its site-packages
    folders are still where sysconfig says, so their .dist-info folders tell what is installed.
    """
    folders = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    for folder in map(Path, folders):
        for info in folder.glob("onnxruntime*.dist-info"):
            if info.name.split("-")[0].lower() in RUNTIME_DISTRIBUTIONS:
                return True
    return False


setup(
    name="fitonnx",
    version="0.1.0",
    description="Fisher Information Trace (FIT) quantization sensitivity for any ONNX model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fitonnx", "fitonnx.*"]),
    install_requires=[
        "onnx>=1.16",
        "ml_dtypes>=0.4",
        "numpy>=1.24",
        "click>=8.1",
        "networkx>=3.0",
        # onnxruntime.quantization's MatMulNBitsQuantizer (the ort target's MatMulNBits export) imports it
        "onnx-ir>=0.1",
        # The user's own onnxruntime (CPU, GPU, training or a vendor build) is kept; plain
        # onnxruntime only where none is installed, so a second `onnxruntime` module never lands.
        *([] if _installed_runtime() else [RUNTIME]),
    ],
    extras_require={
        # Ray where its wheels exist, so the Ray test runs in CI (else it is skipped, saying so).
        "test": ["pytest>=7", "matplotlib>=3.7", "Pillow>=9", "jsonschema>=4", "ray>=2.9; python_version < '3.14'"],
        "plot": ["matplotlib>=3.7"],
        # `fitonnx data` on a folder of images decodes them with Pillow
        "images": ["Pillow>=9"],
        # --ray: score and validate on a Ray cluster (or a Ray started locally)
        "ray": ["ray>=2.9"],
        # The reference engine: install it first, in an environment without another onnxruntime.
        "training": ["onnxruntime-training-cpu==1.19.2; python_version < '3.13'"],
    },
    entry_points={"console_scripts": ["fitonnx=fitonnx.cli.main:main"]},
)
