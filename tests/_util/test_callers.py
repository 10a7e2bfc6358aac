"""lordba._util.callers: a library warning names the first frame outside lordba and contextlib's decorators."""

import contextlib
import warnings

from lordba._util import callers

_LIBRARY = """
import warnings

def warn_here():
    warnings.warn("from the library", stacklevel=caller_stacklevel())

def library(function):
    return function()
"""


def _library() -> dict:
    """Functions compiled as a file of the lordba package (their frames are the library's)."""
    names = {"caller_stacklevel": callers.caller_stacklevel}
    exec(compile(_LIBRARY, callers._PACKAGE + "fake_module.py", "exec"), names)
    return names


def test_a_warning_behind_library_frames_and_a_contextlib_decorator_names_the_callers_line():
    lib = _library()
    decorated = contextlib.contextmanager(_nothing)()(lib["warn_here"])  # (contextlib's inner frame between)
    for call in (lib["warn_here"], lambda: lib["library"](decorated)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        assert [w.filename for w in caught] == [__file__]


def _nothing():
    yield


def test_a_function_outside_lordba_is_its_own_caller():
    assert callers.caller_stacklevel() == 1
