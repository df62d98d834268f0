"""The optional native parts; everything else about the package is in pyproject.toml.

* ``saveit_backup.pg._pagecheck`` checks PostgreSQL page checksums about 5x faster than numpy; without a
  C compiler (or Python headers) the build skips it (``optional=True``) and pagecheck.py uses numpy.
* ``saveit-wal-push`` (native/saveit-wal-push.c), installed next to ``saveit-backup``: the async
  archive_command's client without a Python interpreter's start. It needs a C compiler and OpenSSL's
  headers (libcrypto, loaded at run time for the default spool's name); without them it is not installed and
  ``saveit-backup wal-push --async`` does the same work.
"""

import os

from setuptools import Extension, setup  # first: makes ``distutils`` setuptools' own copy

# isort: split
from distutils.command.build_scripts import build_scripts

CLIENT = "saveit-wal-push"
CLIENT_SOURCE = os.path.join("native", f"{CLIENT}.c")


class BuildScriptsAndClient(build_scripts):
    """The scripts of pyproject.toml, plus the native client when it compiles (a warning otherwise)."""

    def run(self) -> None:
        super().run()
        from distutils.ccompiler import new_compiler
        from distutils.errors import CCompilerError, DistutilsError
        from distutils.sysconfig import customize_compiler

        compiler = new_compiler()
        customize_compiler(compiler)
        temp = os.path.join(self.get_finalized_command("build").build_temp, CLIENT)
        try:
            objects = compiler.compile([CLIENT_SOURCE], output_dir=temp, extra_postargs=["-O2", "-Wall"])
            compiler.link_executable(objects, CLIENT, output_dir=self.build_dir)  # libcrypto: dlopen, when needed
        except (CCompilerError, DistutilsError, OSError) as exc:
            self.warn(f"{CLIENT} not built ({exc}): async archive_command uses saveit-backup wal-push --async")
            return
        os.chmod(os.path.join(self.build_dir, CLIENT), 0o755)


setup(
    ext_modules=[
        Extension(
            "saveit_backup.pg._pagecheck",
            ["src/saveit_backup/pg/_pagecheck.c"],
            optional=True,
            extra_compile_args=["-O2", "-funroll-loops", "-ftree-vectorize"],
        )
    ],
    cmdclass={"build_scripts": BuildScriptsAndClient},
)
