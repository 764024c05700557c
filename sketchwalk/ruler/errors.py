"""The one exception type of `sketchwalk.ruler`."""
from __future__ import annotations


class RulerError(ValueError):
    """Bad input to a RULER generator, suite, JSONL file or scorer; the message says what and where."""
