"""Keep the log lines native code prints on stderr out of the user's terminal.

TensorFlow Lite, absl, XNNPACK, oneDNN and torchao write INFO and WARNING lines straight to file
descriptor 2 ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", "I0000 ... port.cc:153]
oneDNN custom operations are on", "Failed to load .../_C_mxfp8..."). Measured here: none of
TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel, ABSL_MIN_LOG_LEVEL or TFLITE_LOG_SEVERITY silences the
XNNPACK or absl lines of ai-edge-litert 2.3.0 and litert-torch 0.10, so the only reliable way is
to point fd 2 somewhere else while that code runs. The environment variables are still set for
the conversion child (they do quiet TensorFlow's own C++ logging where it is linked in).
`EDGEPACK_DEBUG=1` (the CLI's `--debug`) leaves stderr alone.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "3", "ABSL_MIN_LOG_LEVEL": "3",
             "TFLITE_LOG_SEVERITY": "3"}
MAX_KEPT = 20000  # characters of captured output kept for an error message


def debugging() -> bool:
    return os.environ.get("EDGEPACK_DEBUG", "").strip() not in ("", "0")


def child_env(env: dict) -> dict:
    """`env` for a conversion child: native log levels raised unless debugging."""
    env = dict(env)
    if not debugging():
        for k, v in QUIET_ENV.items():
            env.setdefault(k, v)
    return env


class Captured:
    """What native code printed on stderr inside `quiet_native()` (empty when debugging)."""

    def __init__(self):
        self.text = ""


@contextlib.contextmanager
def quiet_native():
    """Send fd 2 to a temporary file for the duration; yields a `Captured` holding it after.

    Process-wide while active (fd 2 is shared), so keep it around short native calls: importing
    litert-torch or ai-edge-quantizer, creating an interpreter, calibrating. An exception raised
    inside gets the captured text as its `detail` (shown by --debug) when it has none.
    """
    cap = Captured()
    if debugging():
        yield cap
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield cap
        except BaseException as e:
            _restore(saved, sink, cap)
            saved = None
            if cap.text and getattr(e, "detail", None) is None:
                try:
                    e.detail = cap.text
                except AttributeError:
                    pass
            raise
        finally:
            if saved is not None:
                _restore(saved, sink, cap)


def _restore(saved: int, sink, cap: Captured) -> None:
    try:
        sys.stderr.flush()
    except Exception:  # a closed or broken stderr must not hide the real error
        pass
    os.dup2(saved, 2)
    os.close(saved)
    sink.seek(0)
    cap.text = sink.read()[-MAX_KEPT:].decode(errors="replace")
