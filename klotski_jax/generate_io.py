"""Files of `klotski generate`: prompt records in, result records out, stats as JSON.

Plain Python (no JAX) so the CLI's input checks and output schema are testable on their own.

Input: JSON Lines, one object per line with exactly one of
  {"prompt": "text"}                  tokenized with the checkpoint's tokenizer
  {"prompt_token_ids": [1, 2, ...]}   used as is
Other keys (ids, metadata) pass through to the output. Blank lines are skipped. A bad line is
an `InputError` naming the file and the line number.

Output: the input objects plus "token_ids" (the new tokens) and, when the checkpoint has a
tokenizer, "text" (their decoding). Every file is written atomically (temp file + rename), so a
failed or interrupted run never leaves a half-written output that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from klotski_jax.checkpoints.manifest import read_manifest
from klotski_jax.config import ModelConfig
from klotski_jax.models.specs import total_bytes
from klotski_jax.planning.policy import parse_size
from klotski_jax.util import write_atomic

PROMPT_KEYS = ("prompt", "prompt_token_ids")


class InputError(ValueError):
    """A user input that cannot be generated from: a bad prompt file line or prompt."""


@dataclasses.dataclass
class PromptRecord:
    """One prompt: the object written back to the output, and where it came from (for errors)."""

    record: dict[str, Any]  # {"prompt": ...} or {"prompt_token_ids": ...} plus passthrough keys
    where: str  # "prompts.jsonl:3" or "--prompt 1"

    @property
    def prompt(self) -> str | list[int]:
        """What Engine.generate takes: text, or token ids."""
        if "prompt" in self.record:
            return self.record["prompt"]
        return self.record["prompt_token_ids"]


def check_record(obj: Any, where: str) -> PromptRecord:
    """Validate one parsed input object; raise InputError naming `where` on any problem."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    present = [k for k in PROMPT_KEYS if k in obj]
    if len(present) != 1:
        raise InputError(f"{where}: needs exactly one of {', '.join(map(repr, PROMPT_KEYS))}, "
                         f"got {'both' if present else 'neither'}")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise InputError(f"{where}: \"prompt\" must be a non-empty string")
    else:
        ids = obj["prompt_token_ids"]
        # bool is an int subclass in Python; true/false in a token list is a mistake, not 1/0.
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise InputError(f"{where}: \"prompt_token_ids\" must be a non-empty list of integers")
    return PromptRecord(dict(obj), where)


def read_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    """The prompt records of a JSON Lines file (see the module docstring for the schema)."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such prompt file") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise InputError(f"{path}: cannot read prompts: {e}") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        records.append(check_record(obj, where))
    if not records:
        raise InputError(f"{path}: no prompts in the file")
    return records


def prompts_from_args(prompts: Sequence[str]) -> list[PromptRecord]:
    """Records for `--prompt TEXT` arguments, numbered from 1 in error messages."""
    return [check_record({"prompt": p}, f"--prompt {i}") for i, p in enumerate(prompts, start=1)]


def check_prompts(records: Sequence[PromptRecord], vocab_size: int, tokenizer: bool) -> None:
    """Token ids must index the vocabulary, text needs a tokenizer; report the first bad prompt
    by its line (before any weights are loaded)."""
    for r in records:
        ids = r.record.get("prompt_token_ids")
        if ids is None:
            if not tokenizer:
                raise InputError(f"{r.where}: a text prompt, but the checkpoint has no tokenizer "
                                 '(give {"prompt_token_ids": [...]} instead)')
            continue
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"{r.where}: token ids outside the vocabulary [0, {vocab_size}): "
                             f"{bad[:5]}")


def checkpoint_weight_bytes(ckpt: str | os.PathLike[str]) -> int:
    """The weight bytes of a converted checkpoint (what a '30%' budget is a share of), from its
    manifest's config: no weight file is opened."""
    return total_bytes(ModelConfig.from_dict(read_manifest(ckpt)["config"]))


def resolve_size(text: str | None, *, weight_bytes: int) -> int | None:
    """A SIZE option ('512MB', '2GiB', '30%' of the weight bytes) in bytes; None: unlimited."""
    if text is None or text.strip().lower() in ("none", "unlimited", "inf"):
        return None
    return parse_size(text, total=weight_bytes)


def results(records: Sequence[PromptRecord], token_ids: Sequence[Sequence[int]],
            texts: Sequence[str] | None) -> list[dict[str, Any]]:
    """Output objects: each input object plus "token_ids" and, with a tokenizer, "text"."""
    out = []
    for i, r in enumerate(records):
        obj = {**r.record, "token_ids": [int(t) for t in token_ids[i]]}
        if texts is not None:
            obj["text"] = texts[i]
        out.append(obj)
    return out


def write_jsonl(path: str | os.PathLike[str], objects: Iterable[dict[str, Any]]) -> pathlib.Path:
    """One JSON object per line (UTF-8, not ASCII-escaped), written atomically."""
    return write_atomic(path, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))


def write_json(path: str | os.PathLike[str], obj: Any) -> pathlib.Path:
    """An indented JSON document, written atomically."""
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


__all__ = ["InputError", "PromptRecord", "check_prompts", "check_record", "checkpoint_weight_bytes",
           "prompts_from_args",
           "read_prompts", "resolve_size", "results", "write_atomic", "write_json",
           "write_jsonl"]
