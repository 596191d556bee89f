"""The package's version, in a module of its own so that any module can record it."""

VERSION = "0.1.0"
