"""edgepack: prune, export, quantize, validate, deploy and benchmark models for edge devices."""
from .version import __version__  # noqa: F401

__all__ = ["build", "BuildConfig", "EdgepackError"]


def __getattr__(name):  # lazy: `import edgepack` stays cheap, torch loads on first use
    if name == "build":
        from .pipeline import build
        return build
    if name == "BuildConfig":
        from .config import BuildConfig
        return BuildConfig
    if name == "EdgepackError":
        from .errors import EdgepackError
        return EdgepackError
    raise AttributeError(name)
