"""normswap's version, in a module of its own so that any part of the package can read it without importing the
package root (``pyproject.toml`` reads it from here too).

>>> from normswap._version import __version__
>>> __version__.count(".")
2
"""

__version__ = "0.6.3"
