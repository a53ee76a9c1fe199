from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fitonnx",
    version="0.1.0",
    description="Fisher Information Trace (FIT) quantization sensitivity for any ONNX model",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["fitonnx", "fitonnx.*"]),
    install_requires=[
        "onnx>=1.16",
        # The CPU build of onnxruntime-training; it provides the `onnxruntime` module, so plain
        # onnxruntime must never be installed beside it.
        "onnxruntime-training-cpu==1.19.2",
        "numpy>=1.24",
        "click>=8.1",
        "networkx>=3.0",
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib>=3.7", "Pillow>=9", "jsonschema>=4"],
        "plot": ["matplotlib>=3.7"],
        # `fitonnx data` on a folder of images decodes them with Pillow
        "images": ["Pillow>=9"],
    },
    entry_points={"console_scripts": ["fitonnx=fitonnx.cli.main:main"]},
)
