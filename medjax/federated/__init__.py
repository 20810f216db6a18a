"""Federated learning: rounds over sites (see medjax/federated/README in the module docstrings)."""
