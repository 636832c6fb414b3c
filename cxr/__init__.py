"""cxr: a reproducible pipeline for COVID-19 pneumonia detection in chest X-rays."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`from cxr import Predictor` without importing torch for every `import cxr...`: the
    stages and commands that do not predict stay as light as before."""
    if name == "Predictor":
        from cxr.api import Predictor

        return Predictor
    raise AttributeError(f"module 'cxr' has no attribute {name!r}")
