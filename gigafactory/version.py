"""The package's version, in a module of its own: anything may import it without importing the
package's ``__init__`` (and the client it exports)."""

__version__ = "0.1.0"
