"""Builds the `tidal` op library through CMake (the one build definition) and packages tidal_ext.

    pip install --no-build-isolation -e .      # development (the extension lands in tidal_ext/_C*.so)
    TIDAL_BUILD_TESTS=1 pip install ...        # also builds the GoogleTest suite in build/
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeLibrary(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch  # the build runs against the installed torch (no build isolation)

        build_dir = os.environ.get("TIDAL_BUILD_DIR", os.path.join(ROOT, "build"))
        tests = "ON" if os.environ.get("TIDAL_BUILD_TESTS", "0") == "1" else "OFF"
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('TIDAL_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DTIDAL_BUILD_TESTS={tests}",
        ]
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 2)])
        # The Python extension (op objects + bindings) lands where setuptools expects it
        # (tidal_ext/_C.<abi>.so), for regular and editable installs alike.
        dest = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(build_dir, os.path.basename(dest)), dest)


setup(
    name="tidal_ext",
    version="0.1.0",
    description="TidalDecode: position persistent sparse attention ops for PyTorch",
    packages=find_packages(include=["tidal_ext", "tidal_ext.*"]),
    ext_modules=[CMakeLibrary("tidal_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    zip_safe=False,
)
