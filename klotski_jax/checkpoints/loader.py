"""`klotski_jax.load`: a converted checkpoint as the all-experts-resident reference Model."""

from __future__ import annotations

import logging
import os
import pathlib

from klotski_jax.checkpoints.store import CheckpointReader
from klotski_jax.models.reference import Model

log = logging.getLogger(__name__)


def load_tokenizer(tokenizer_dir: pathlib.Path | None):  # -> PreTrainedTokenizerBase | None
    """The checkpoint's HF tokenizer (offline, from its own files), or None if it has none."""
    if tokenizer_dir is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tok.padding_side = "left"  # generation batches are left-padded
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load(ckpt_dir: str | os.PathLike) -> Model:
    """Load a checkpoint written by `klotski convert` with every weight on the device.

    Use it to check a conversion (`Model.logits`) or as the simplest generation path
    (`Model.generate_reference`). Models larger than device memory need the pipeline instead.
    """
    reader = CheckpointReader(ckpt_dir)
    log.info("loading %s (%s, %d layers)", reader.path, reader.config.family.value,
             reader.config.num_layers)
    return Model.from_weights(reader.config, reader.read_all(),
                             tokenizer=load_tokenizer(reader.tokenizer_dir))
