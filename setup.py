"""graphgrpo_jax: Graph-GRPO relevance and query-rewriting RL for e-commerce search, in JAX/Flax."""

from setuptools import find_packages, setup

# Versions verified to resolve together on Python 3.11 (see README, "Environment").
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "jraph==0.0.6.dev0",  # jraph's only release is a pre-release
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "tensorflow-datasets==4.9.10",  # used without TensorFlow: array_record + as_data_source
    "array-record==0.8.6",
    "transformers==5.24.0",  # tokenizers and configs only; no torch at run time
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "gguf==0.19.0",  # reads GGUF checkpoints (models/gguf.py); needs only numpy, pyyaml, requests, tqdm
    "jinja2==3.1.6",  # renders checkpoints' chat templates (transformers' apply_chat_template)
    "numpy==2.4.6",
    "pyarrow==26.0.1",
    "tantivy==0.27.0",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "flatbuffers==25.12.19",  # jax.export serialisation (the served student, search/serving.py)
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "hypothesis==6.170.17",
        "tensorboard==2.21.0",  # reads event files back in tests
        # executes the Colab notebooks top to bottom (tests/test_notebooks.py)
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
    ],
    # Regenerates the committed HF parity fixtures (CPU torch only).
    "torch": ["torch==2.13.0"],
    # The peers of experiments/bench/: PyTorch, transformers.generate, TRL's GRPOTrainer and PEFT's LoRA.
    "bench": ["torch==2.13.0", "trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0", "peft==0.22.0"],
}

setup(
    name="graphgrpo_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["graphgrpo_jax", "graphgrpo_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
