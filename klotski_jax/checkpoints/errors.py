"""Errors of checkpoint conversion and reading.

Every error is a `ConversionError` (a `ValueError`), so the CLI can map the whole family to one
`error: ...` line and exit status 2. Each subclass names one kind of problem, and every message
names the file and the tensor (or config field) involved, so a user can fix the input without
reading a traceback.
"""

from __future__ import annotations


class ConversionError(ValueError):
    """An HF checkpoint (or a converted one) that cannot be converted (or read) faithfully."""


class UnsupportedModelError(ConversionError):
    """config.json describes a model this project does not implement (model_type, rope, ...)."""


class UnmappedTensorError(ConversionError):
    """A tensor in the checkpoint that no weight spec consumes."""


class MissingTensorError(ConversionError):
    """A weight spec whose HF tensor is absent from the checkpoint."""


class DuplicateTensorError(ConversionError):
    """The same tensor name stored in two files of one checkpoint."""


class ShapeMismatchError(ConversionError):
    """A tensor whose shape disagrees with the one the config implies."""


class UnsupportedDtypeError(ConversionError):
    """A weight tensor stored in a dtype we cannot convert (e.g. integer, or an 8-bit float
    other than block-scaled e4m3)."""


class UnsupportedQuantizationError(ConversionError):
    """config.json's `quantization_config` describes a quantized checkpoint this project does
    not read (a method other than block-scaled fp8, another fp8 format, a missing or malformed
    block size), or `--quantize fp8` cannot keep the source's fp8 blocks as they are."""


class CorruptFileError(ConversionError):
    """A truncated or malformed file (safetensors header/data, index, config, store chunk)."""


class MissingShardError(ConversionError):
    """A shard listed in model.safetensors.index.json that is not on disk."""


class MissingFileError(ConversionError):
    """A required file (config.json, model.safetensors, manifest.json) that is not there."""


class OutputExistsError(ConversionError):
    """The output directory exists and replacing it was not asked for (or is unsafe)."""


class ManifestError(ConversionError):
    """A converted checkpoint whose manifest.json is missing, foreign, too new or inconsistent."""
