"""Quiet by default: the known third-party messages that tell a user nothing about their run are
filtered, each narrowly by its text; ``--verbose`` shows everything."""

from __future__ import annotations

import warnings

# (message regex, where it comes from): deprecations inside the libraries we call, not in our code
KNOWN_NOISE = (
    (r"`is_gradient_checkpointing` is deprecated", "transformers (PreTrainedModel, called by peft)"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "lightning.pytorch.utilities._pytree"),
    # we pass the arguments (``--verbose`` taken out) explicitly: they are the command line's
    (r"LightningCLI's args parameter is intended to run from within Python", "lightning.pytorch.cli"),
)


def silence_known_noise() -> None:
    """Ignore the warnings of :data:`KNOWN_NOISE`; every other warning still shows."""
    for message, _source in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
