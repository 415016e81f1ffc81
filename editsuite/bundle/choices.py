"""The choices of the settings that say how a model runs, as Enums: the CLI's options, the loader's checks
and the JSON description read them from here."""

from __future__ import annotations

import enum


class Backend(str, enum.Enum):
    AUTO, TORCH, COREML = "auto", "torch", "coreml"


class Device(str, enum.Enum):
    AUTO, CPU, CUDA, MPS = "auto", "cpu", "cuda", "mps"


class Dtype(str, enum.Enum):
    AUTO, FLOAT32, BFLOAT16, FLOAT16 = "auto", "float32", "bfloat16", "float16"


class ComputeUnits(str, enum.Enum):
    ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY = "all", "cpu-and-ne", "cpu-and-gpu", "cpu-only"


class Attention(str, enum.Enum):
    """How a Core ML conversion lays out attention (see convert/ane.py)."""
    ORIGINAL, SPLIT_EINSUM, SPLIT_EINSUM_V2 = "original", "split-einsum", "split-einsum-v2"


class PredictionType(str, enum.Enum):
    EPSILON, V_PREDICTION = "epsilon", "v_prediction"


def values_of(choices: type[enum.Enum]) -> tuple[str, ...]:
    return tuple(c.value for c in choices)
