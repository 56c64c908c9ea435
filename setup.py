"""Package discovery that pyproject.toml alone cannot express: every package under mailsetup/ is found
(a new subpackage can never be left out of the wheel again), and templates/ ships as mailsetup.templates."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["mailsetup", "mailsetup.*"]), "mailsetup.templates"],
    package_dir={"mailsetup.templates": "templates"},
)
