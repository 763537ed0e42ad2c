"""Quantization methods by name: each method is a dataclass config registered under its name (torchao/vLLM style).

    cfg = get_method("rtn-int4", group_size=64, sym=False)     # or parse_method("rtn-int4:group_size=64,sym=false")

A config validates its fields on construction and raises ConfigError naming the field and value.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..errors import ConfigError

METHODS: dict[str, type[QuantConfig]] = {}

INT4_GROUP_SIZES = (32, 64, 128)  # what the int4 kernels implement
EMBEDDINGS = ("bf16", "int8")  # how the token embedding (and the output head, tied or not) is stored


@dataclasses.dataclass
class QuantConfig:
    """Base of every method config. `calibrated`: needs calibration activations (so not applied at load).

    `embeddings`: "bf16" keeps the token embedding and output head dense; "int8" stores them as per-row int8
    (an Int8Weight: a row gather for the lookup, quant_linear for the head). In SmolLM2 the tied embedding is
    49152 x 576, a fifth of the model, so no plan reaches 2.5x smaller than bf16 without it.
    """

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False
    embeddings: str = "bf16"

    def __post_init__(self) -> None:
        check_choice(self.name, "embeddings", self.embeddings, EMBEDDINGS)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


def register(cls: type[QuantConfig]) -> type[QuantConfig]:
    """Class decorator: make `cls` available to get_method under `cls.name`."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **options) -> QuantConfig:
    """The config of method `name` with `options` as its fields; ConfigError for an unknown name or field."""
    if name not in METHODS:
        raise ConfigError(f"unknown quantization method {name!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"quantization method {name!r} has no option(s) {', '.join(unknown)}; "
                          f"its options: {', '.join(known) or 'none'}")
    return cls(**options)


def parse_method(spec: str) -> QuantConfig:
    """`METHOD[:key=value,...]` (e.g. "rtn-int4:group_size=64,sym=false") -> its config."""
    name, _, rest = spec.strip().partition(":")
    options = {}
    for piece in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = piece.partition("=")
        if not eq:
            raise ConfigError(f"quantization {spec!r}: option {piece!r} is not KEY=VALUE")
        options[key.strip()] = _value(value.strip())
    return get_method(name.strip(), **options)


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_choice(method: str, field: str, value, allowed) -> None:
    """ConfigError unless value is one of allowed (bools are never numbers here)."""
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"{method}: {field}={value!r} is not supported; the kernels do "
                          f"{', '.join(map(str, allowed))}")


def check_fraction(method: str, field: str, value, low: float = 0.0, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{method}: {field}={value!r} must be a number in [{low}, {high}]")


def check_bool(method: str, field: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{method}: {field}={value!r} must be true or false")


@dataclasses.dataclass
class QuantResult:
    """One quantized linear: the packed weight (a ringlet.kernels.quant_gemm weight), its relative error
    (output error ||X dW^T|| / ||X W^T|| when calibration statistics were given, else the Frobenius weight error;
    see grids.relative_error) and the group size used (None for per-channel / per-tensor)."""

    weight: object
    error: float
    group_size: int | None
