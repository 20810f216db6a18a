"""Thin command-line tools over the library (each is `python -m medjax.tools.<name> --help`)."""
