"""Every JSON file fitonnx writes validates against its JSON Schema in docs/schemas/.

With the ``jsonschema`` package (the ``test`` extra) the schemas are checked by it, and checked as
schemas; without it by the small validator below, which knows the keywords the files use."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fitonnx.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"
MODELS = ROOT / "models"
TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def _is(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, TYPES[kind])


def small_validate(value: Any, schema: dict[str, Any], where: str = "$", root: dict[str, Any] | None = None) -> None:
    """type, enum, properties, required, additionalProperties, propertyNames.pattern, items, minItems,
    and ``$ref`` to ``#/$defs/NAME`` of ``root`` (the whole schema; default ``schema``)."""
    root = schema if root is None else root
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        assert name in root.get("$defs", {}), f"{where}: unknown $ref {schema['$ref']!r}"
        schema = root["$defs"][name]
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: expected one of {schema['enum']}, found {value!r}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        assert any(_is(value, k) for k in kinds), f"{where}: expected {kinds}, found {type(value).__name__}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        pattern = schema.get("propertyNames", {}).get("pattern")
        for key, item in value.items():
            if pattern is not None:
                assert re.search(pattern, key), f"{where}: key {key!r} does not match {pattern}"
            if key in props:
                small_validate(item, props[key], f"{where}.{key}", root)
            elif isinstance(extra, dict):
                small_validate(item, extra, f"{where}.{key}", root)
            else:
                assert extra is not False, f"{where}: unexpected key {key!r}"
    if isinstance(value, list):
        assert len(value) >= schema.get("minItems", 0), f"{where}: expected at least {schema['minItems']} items"
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            small_validate(item, schema["items"], f"{where}[{i}]", root)


def check(path: Path, schema_name: str) -> None:
    schema = json.loads((SCHEMAS / schema_name).read_text(encoding="utf-8"))
    doc = json.loads(path.read_text(encoding="utf-8"))
    try:
        import jsonschema  # the test extra; the small validator stands in without it
    except ImportError:
        small_validate(doc, schema)
        return
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    small_validate(doc, schema)  # the fallback agrees


def run(*args: Any) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr + result.stdout


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """One real file (or several) of every JSON output, from the bundled models."""
    d = tmp_path_factory.mktemp("json")
    cnn, mlp = MODELS / "mnist_cnn.onnx", MODELS / "digits_mlp.onnx"
    run("score", cnn, "--json", d / "score.json")
    run("score", MODELS / "zoo" / "tiny_bert_dynamo.onnx", "--max-samples", "8", "--json", d / "score2.json")
    run("score", mlp, "--max-samples", "1", "--json", d / "score3.json")  # no ranking stability
    formats = ("--format", "int4/ch,fp8e4m3", "--format", "nvfp4/16", "--target", "ort")  # FP weights and activations
    run("score", cnn, "--max-samples", "4", *formats, "--json", d / "score4.json")
    run("inspect", MODELS / "zoo" / "mbv3_small_ts.onnx", "--json", d / "inspect.json")
    run(
        "validate",
        mlp,
        "--configs",
        "3",
        "--resamples",
        "20",
        "--json",
        d / "validate.json",
        "--baseline",
        "hessian",
        "--hessian-probes",
        "2",
    )
    pair = MODELS / "pair"
    run("compare", pair / "cnn_torch.onnx", pair / "cnn_jax.onnx", "--max-samples", "4", "--json", d / "compare.json")
    run("recommend", cnn, "--avg-bits", "5", "--target", "ort", "-o", d / "ort")
    run("recommend", cnn, "--size-kb", "40", "--act-avg-bits", "10", "--target", "qnn", "-o", d / "qnn")
    run("recommend", cnn, "--max-fit", "1", "-o", d / "generic")
    formats = ("--target", "tensorrt", "--formats", "--act-avg-bits", "8.5")  # int8, fp8, fp16, mxfp8, nvfp4
    run("recommend", cnn, "--avg-bits", "8.03", *formats, "-o", d / "formats")
    run(
        "export",
        cnn,
        "--recommendation",
        d / "qnn" / "recommendation.json",
        "--format",
        "qnn-1.0.0",
        "-o",
        d / "v1.encodings",
    )
    run(
        "export",
        cnn,
        "--recommendation",
        d / "ort" / "recommendation.json",
        "--format",
        "overrides",
        "--per-channel",
        "-o",
        d / "per_channel_overrides.json",
    )
    return {
        "score.schema.json": [d / f"score{k}.json" for k in ("", 2, 3, 4)],
        "inspect.schema.json": [d / "inspect.json"],
        "validate.schema.json": [d / "validate.json"],
        "compare.schema.json": [d / "compare.json"],
        "recommendation.schema.json": [d / t / "recommendation.json" for t in ("ort", "qnn", "generic", "formats")],
        "pareto.schema.json": [d / t / "pareto.json" for t in ("ort", "qnn", "generic", "formats")],
        "ort_overrides.schema.json": [d / "ort" / "ort_overrides.json", d / "per_channel_overrides.json"],
        "qnn_encodings.schema.json": [d / "qnn" / "mnist_cnn.encodings"],
        "qnn_encodings_1.0.0.schema.json": [d / "v1.encodings"],
    }


def test_every_schema_is_tested(outputs: dict[str, list[Path]]) -> None:
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(outputs)


@pytest.mark.parametrize(
    "schema",
    sorted(p.name for p in SCHEMAS.glob("*.schema.json")),
)
def test_output_validates_against_its_schema(outputs: dict[str, list[Path]], schema: str) -> None:
    for path in outputs[schema]:
        check(path, schema)


def test_the_small_validator_catches_what_matters() -> None:
    schema = json.loads((SCHEMAS / "score.schema.json").read_text(encoding="utf-8"))
    with pytest.raises(AssertionError, match="missing 'tensors'"):
        small_validate({k: None for k in schema["required"] if k != "tensors"}, schema)
    with pytest.raises(AssertionError, match="expected"):
        small_validate({"a": [{"quant_type": 4}]}, json.loads((SCHEMAS / "ort_overrides.schema.json").read_text()))


@pytest.mark.parametrize(
    ("path", "broken", "message"),
    [
        (("correlation", "kl", "fit", "spearman"), "high", "expected"),  # through two $refs
        (("families", 0, "correlation", "dloss", "fit"), None, "expected"),
        (("families", 0, "working_correlation", "kl", "fit_grid", "kendall_ci"), {}, "expected"),
        (("reliability", "kl", "splits"), 2.5, "expected"),
    ],
)
def test_a_broken_validate_document_is_rejected(
    outputs: dict[str, list[Path]], path: tuple[str | int, ...], broken: Any, message: str
) -> None:
    """The shared definitions ($defs) still check every place that refers to them."""
    schema = json.loads((SCHEMAS / "validate.schema.json").read_text(encoding="utf-8"))
    doc = json.loads(outputs["validate.schema.json"][0].read_text(encoding="utf-8"))
    small_validate(doc, schema)  # the real document passes
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    assert path[-1] in parent  # the field exists in the real output
    parent[path[-1]] = broken
    with pytest.raises(AssertionError, match=message):
        small_validate(doc, schema)
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def test_a_missing_required_field_under_a_ref_is_rejected(outputs: dict[str, list[Path]]) -> None:
    schema = json.loads((SCHEMAS / "validate.schema.json").read_text(encoding="utf-8"))
    doc = json.loads(outputs["validate.schema.json"][0].read_text(encoding="utf-8"))
    del doc["families"][0]["correlation"]["kl"]["quadratic"]["kendall"]
    with pytest.raises(AssertionError, match="missing 'kendall'"):
        small_validate(doc, schema)
