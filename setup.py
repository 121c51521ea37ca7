"""Packaging for hf-knowedit."""

import re
from pathlib import Path

from setuptools import find_packages, setup


ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "hf_knowedit" / "version.py").read_text()).group(1)

setup(
    name="hf-knowedit",
    version=VERSION,
    description="Knowledge editing for Hugging Face models: small, reversible, shareable edits.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_knowedit", "hf_knowedit.*"])
    + ["hf_knowedit.hub_cards", "hf_knowedit.editing_configs"],
    # The design card keeps card templates and ready configs at the top level; they ship inside the package.
    package_dir={
        "hf_knowedit": "hf_knowedit",
        "hf_knowedit.hub_cards": "hub_cards",
        "hf_knowedit.editing_configs": "editing_configs",
    },
    package_data={"hf_knowedit.hub_cards": ["*.md"], "hf_knowedit.editing_configs": ["*.json", "*/*.json"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.21,<0.22",
        "accelerate>=1.15,<2",
        "huggingface_hub>=1.0,<3",
        "evaluate==0.4.6",
        "safetensors>=0.4",
        "gguf>=0.19,<0.20",
        "tqdm",
        "numpy",
        "pyyaml",
        "jinja2",
    ],
    extras_require={
        "test": ["pytest", "ruff"],
        "stats": ["datasets"],
        "plots": ["matplotlib"],
    },
    entry_points={"console_scripts": ["hf-knowedit=hf_knowedit.cli:main"]},
)
