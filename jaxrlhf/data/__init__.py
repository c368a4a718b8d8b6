"""Data: dataset files -> records -> encoded examples -> Grain pipelines -> fixed-shape batches.

Modules, one job each: ``sources`` (random-access readers with cached indexes),
``formats`` (TRL record formats -> typed examples), ``chat`` (template rendering
and assistant spans), ``control_tokens`` (special-token text inside content),
``encode`` (``encode_sft`` / ``encode_sft_examples`` / ``encode_dpo`` and the mask
rule), ``validate`` (policies and invariants), ``pipeline`` (grain), ``config``
(``DataConfig``), ``inspect`` (what ``jaxrlhf inspect-data`` shows).
"""

from jaxrlhf.data.assets import asset_path
from jaxrlhf.data.config import Columns, DataConfig, DatasetConfig
from jaxrlhf.data.encode import encode_dpo, encode_sft, encode_sft_examples
from jaxrlhf.data.errors import DROP_REASONS, DataError, ExampleDropped, Origin
from jaxrlhf.data.tokenizer import load_tokenizer

__all__ = [
    "encode_sft",
    "encode_sft_examples",
    "encode_dpo",
    "DataConfig",
    "DatasetConfig",
    "Columns",
    "make_iterator",
    "DataIterator",
    "load_tokenizer",
    "DataError",
    "ExampleDropped",
    "DROP_REASONS",
    "Origin",
    "asset_path",
]


def __getattr__(name):
    # The pipeline needs grain; configs and encoders do not, so they import on machines without it.
    if name in ("make_iterator", "DataIterator"):
        from jaxrlhf.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'jaxrlhf.data' has no attribute {name!r}")
