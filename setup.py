"""The optional C extension; everything else about the package is in pyproject.toml.

``saveit_backup.pg._pagecheck`` checks PostgreSQL page checksums about 5x faster than numpy; without a
C compiler (or Python headers) the build skips it (``optional=True``) and pagecheck.py uses numpy.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "saveit_backup.pg._pagecheck",
            ["src/saveit_backup/pg/_pagecheck.c"],
            optional=True,
            extra_compile_args=["-O2", "-funroll-loops", "-ftree-vectorize"],
        )
    ]
)
