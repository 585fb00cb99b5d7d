"""embedder: train general-purpose text embedding models with JAX/Flax.

`from embedder import Embedder` loads any saved model (workdir, checkpoint
step, parameter export, soup, Hugging Face / sentence-transformers folder).
"""

from embedder import host_memory as _host_memory
from embedder import xla_cpu_flags as _xla_cpu_flags

# Before any JAX backend starts: faster CPU encoders (see embedder/xla_cpu_flags.py) and
# XLA:CPU buffers reused between steps (embedder/host_memory.py); EMBEDDER_XLA_CPU_DEFAULTS=0
# opts out of both.
_xla_cpu_flags.apply()
_host_memory.apply()

__version__ = "0.1.0"

__all__ = ["Embedder", "__version__"]


def __getattr__(name):
    # Lazy so that `import embedder` does not import JAX (CLIs set flags first).
    if name == "Embedder":
        from embedder.inference import Embedder

        return Embedder
    raise AttributeError(f"module 'embedder' has no attribute {name!r}")
