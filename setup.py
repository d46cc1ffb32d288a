"""Build of the native extensions.

Every ``_native/<name>.pyx`` becomes ``launcher._native.<name>``; the files it
includes live in ``_native/<name>/`` (not built on their own). Cython looks
an extension's declarations up by its full name: ``_native/<name>.pxd`` is
found through ``_native/launcher/_native/<name>.pxd``, which includes it.
There is no pure-Python fallback: a source that does not compile fails the
build.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

extensions = [
    Extension(
        f"launcher._native.{os.path.splitext(os.path.basename(path))[0]}",
        [path],
        language="c++",
        include_dirs=["_native"],
        extra_compile_args=["-O2", "-std=c++17", "-Wall", "-Wno-unused-function"],
    )
    for path in sorted(glob.glob("_native/*.pyx"))
]

setup(
    packages=find_packages(include=["launcher", "launcher.*"]),
    ext_modules=cythonize(
        extensions,
        # _native/: the .pxd files the sources cimport, and launcher/_native/<name>.pxd (see above).
        include_path=["_native"],
        language_level=3,
        compiler_directives={"embedsignature": True},
    ),
)
