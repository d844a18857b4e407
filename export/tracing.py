"""tracing_context: torch.onnx.export without its noise and without module state changes.

Each export logs one line per torchvision op it cannot register when torchvision is absent
(we export no vision ops), and warns that a named dynamic axis "will not be used" when two
inputs share it (expected: input_ids and attention_mask share the batch). Real problems
still raise, and other warnings still show. MoLoRA layers keep no `last_routing` while
tracing (torch.export warns about each tensor attribute assigned during export).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

from moe_ext.molora.layer import routing_override

_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)
_NOISY_WARNINGS = (r"# The axis name: .* will not be used",)


@contextlib.contextmanager
def tracing_context() -> Iterator[None]:
    """Context manager (and decorator) around an export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), routing_override(record=False):
            for pattern in _NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
