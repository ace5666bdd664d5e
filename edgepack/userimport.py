"""Import a user object named `path/to/file.py:name` or `package.module:name`."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import EdgepackError


def import_attr(spec: str, what: str = "factory"):
    """`path/to/file.py:name` or `package.module:name` -> the object."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise EdgepackError(f"{what} {spec!r} must look like file.py:name or package.module:name")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise EdgepackError(f"model file {path} does not exist", "check the path before the ':'")
        mod_name = "edgepack_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:
            raise EdgepackError(f"importing {path} failed: {type(e).__name__}: {e}",
                                "run `python {path}` to see the error in your file") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise EdgepackError(f"cannot import module {target!r}: {e}",
                                "pass a file path (file.py:name) or make the package importable") from e
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise EdgepackError(f"{target} has no {what} named {attr!r}",
                            f"callables there: {', '.join(public[:12]) or 'none'}")
    return getattr(module, attr)
