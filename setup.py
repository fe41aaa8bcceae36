"""Builds the ledger's compiled hashing module; everything else about the package is in pyproject.toml.

The module is optional: without a C compiler the build goes on and the
ledger hashes in Python, with the same results, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "services.ledger._native",
            sources=["services/ledger/_native.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
