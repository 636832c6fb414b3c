"""cxr: a reproducible pipeline for COVID-19 pneumonia detection in chest X-rays."""

__version__ = "0.1.0"
