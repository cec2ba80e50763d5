"""Build the ``fastbn._kernels`` Cython extension, with OpenMP when the compiler has it.

Without OpenMP the extension still builds (serial) and ``fastbn.show_config()`` says so.
"""
import os
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_has_openmp(compiler) -> bool:
    """Compile and link a tiny OpenMP program with the compiler setuptools will use."""
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_openmp.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            objects = compiler.compile([path], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objects, os.path.join(tmp, "check_openmp"),
                                     extra_postargs=["-fopenmp"])
        except Exception:
            return False
    return True


def _compiler_accepts(compiler, flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "check_flag.c")
        with open(path, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([path], output_dir=tmp, extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExtOpenMP(build_ext):
    def build_extensions(self):
        use_openmp = os.environ.get("FASTBN_DISABLE_OPENMP", "") == "" and \
            _compiler_has_openmp(self.compiler)
        if not use_openmp:
            print("fastbn: the compiler has no OpenMP; building the serial kernels", file=sys.stderr)
        # Built from source on the machine that runs it: use its SIMD (AVX2/AVX-512) unless asked
        # not to (FASTBN_PORTABLE=1 for binaries that move between machines).
        native = os.environ.get("FASTBN_PORTABLE", "") == "" and _compiler_accepts(
            self.compiler, "-march=native")
        for ext in self.extensions:
            if native:
                ext.extra_compile_args += ["-march=native"]
            if use_openmp:
                ext.extra_compile_args += ["-fopenmp"]
                ext.extra_link_args += ["-fopenmp"]
        super().build_extensions()


extensions = [
    Extension(
        "fastbn._kernels",
        ["fastbn/_kernels.pyx"],
        include_dirs=[np.get_include()],
        # -O3 for the vectorizer; no -ffast-math: the statistics rely on IEEE evaluation order.
        # -ffp-contract=off: no fused multiply-adds, so a*b + c rounds as NumPy and Numba round it
        # (the C fast path and the general path update running statistics bit for bit alike).
        extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
    cmdclass={"build_ext": BuildExtOpenMP},
)
