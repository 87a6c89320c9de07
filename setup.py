"""setuptools' build step, extended by one thing: the project files at the repository's top level
(builder/project.py DATA_NAMES) are copied into the built package as builder/_project/, so a wheel
carries them as package data. Everything else is in pyproject.toml. An editable install skips the
copy: it runs from the checkout, which has them in place."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# The same names as builder/project.py's DATA_NAMES (this runs before the package is importable).
DATA_NAMES = ("Dockerfile", "pyproject.toml", "dirtyram-src", "buildroot-external", "matrices")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "dirtyram")  # dirtyram: a local `make`'s output


class BuildPyWithProjectFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "builder" / "_project"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in DATA_NAMES:
            src = HERE / name
            if src.is_dir():
                shutil.copytree(src, dest / name, ignore=SKIP)
            elif src.is_file():
                shutil.copy2(src, dest / name)
            else:
                raise SystemExit(f"setup.py: {src} is missing; build the package from a dirtylog checkout or sdist")


setup(cmdclass={"build_py": BuildPyWithProjectFiles})
