"""edgekv: long-context LLM inference with an offloaded, compressed KV cache.

    import edgekv
    engine = edgekv.load()          # the embedded SmolLM2-135M-Instruct, default policy
    result = engine.generate("What is a Python decorator?", max_new_tokens=64)
    print(result.text, result.stats)
"""

from .config import Policy
from .errors import EdgekvError

__all__ = ["EdgekvError", "Policy", "load"]


def load(model=None, **policy):
    """Load a model (None = embedded default) with policy keywords; see `edgekv.engine.load`."""
    from .engine import load as _load

    return _load(model, **policy)
