"""The caller a library warning names: the first frame outside the lordba package, however many of the library's own
frames (and of contextlib's decorators, which its methods wear) are between it and the warning."""

from __future__ import annotations

import contextlib
import os
import sys

_PACKAGE = os.path.dirname(os.path.dirname(__file__)) + os.sep  # (lordba's folder, as its code objects name files)


def _inside(filename: str) -> bool:
    return filename.startswith(_PACKAGE) or filename == contextlib.__file__


def caller_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` for a warning of the function that calls this, naming the first frame
    outside lordba (and contextlib): the user's line that called into the library, whichever way the call came
    (``LoRDBAModel.from_pretrained`` → ``load_adapter`` → its decorator → ... → the warning, or ``load_adapter``
    directly), where a fixed number named a frame of the library for some of them."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _inside(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
