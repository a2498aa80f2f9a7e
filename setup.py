"""Packaging for the demucs music source separation project."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements(name: str) -> list:
    """Requirement lines of `name`, without comments and `-r` includes."""
    lines = (line.split("#")[0].strip() for line in (HERE / name).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-r")]


def read_extras(name: str) -> dict:
    """`{extra: requirements}` from the `# extra: NAME` sections of `name`; `dev` gets them all
    (the test suite exercises training, quantized models and ONNX export)."""
    extras: dict = {}
    current = None
    for line in (HERE / name).read_text().splitlines():
        if line.startswith("# extra:"):
            current = extras.setdefault(line.split(":", 1)[1].strip(), [])
            continue
        requirement = line.split("#")[0].strip()
        if requirement and not requirement.startswith("-r") and current is not None:
            current.append(requirement)
    extras["dev"] = [requirement for group in extras.values() for requirement in group]
    return extras


def read_version() -> str:
    for line in (HERE / "demucs" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("demucs/__init__.py defines no __version__")


setup(
    name="demucs",
    version=read_version(),
    description="Music source separation in the waveform domain.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["demucs", "demucs.*"]),
    package_data={"demucs": ["py.typed", "remote/*.txt", "remote/*.yaml"]},
    include_package_data=True,
    install_requires=read_requirements("requirements_minimal.txt"),
    extras_require=read_extras("requirements.txt"),
    entry_points={"console_scripts": ["demucs=demucs.separate:main"]},
    license="MIT",
    classifiers=[
        "Topic :: Multimedia :: Sound/Audio",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "License :: OSI Approved :: MIT License",
    ],
)
