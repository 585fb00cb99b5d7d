"""embedder: train general-purpose text embedding models with JAX/Flax.

`from embedder import Embedder` loads any saved model (workdir, checkpoint
step, parameter export, soup, Hugging Face / sentence-transformers folder).
`embedder.tune_cpu()`, called before the first JAX computation, gives a CPU
process the tuning the project's commands use; importing the package changes
nothing process-wide.
"""

from embedder.cpu_tuning import tune_cpu

__version__ = "0.1.0"

__all__ = ["Embedder", "tune_cpu", "__version__"]


def __getattr__(name):
    # Lazy so that `import embedder` does not import JAX.
    if name == "Embedder":
        from embedder.inference import Embedder

        return Embedder
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")
