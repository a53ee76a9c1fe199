"""Two distributions providing the onnxruntime module are refused with one line naming both."""

from __future__ import annotations

import pytest

from fitonnx.errors import FitonnxError
from fitonnx.model.distributions import Provider, check_single_runtime, runtime_providers


def test_this_environment_has_exactly_one_runtime() -> None:
    found = runtime_providers()
    assert len(found) == 1, found
    assert found[0].name.lower().startswith("onnxruntime")
    check_single_runtime()


def test_two_runtimes_are_refused_naming_both_and_the_fix() -> None:
    both = (Provider("onnxruntime", "1.32.0"), Provider("onnxruntime-training-cpu", "1.19.2"))
    with pytest.raises(FitonnxError) as info:
        check_single_runtime(both)
    text = str(info.value)
    assert "\n" not in text
    assert "onnxruntime 1.32.0" in text and "onnxruntime-training-cpu 1.19.2" in text
    assert "pip uninstall -y onnxruntime onnxruntime-training-cpu" in text
