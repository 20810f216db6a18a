"""medjax: JAX research codebase for deep learning on medical images.

Importing medjax changes no global state (no jax.config updates, no device queries).
"""

__version__ = "0.1.0"
