"""Shim for Beam's `--setup_file ./setup.py` (Dataflow workers install the package with it);
everything is declared in pyproject.toml."""
import setuptools

setuptools.setup()
