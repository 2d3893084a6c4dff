"""The query runtime: decoders over an LMClient, constraints as hard token masks, results.

Public entry points live in `api` (run, run_sync, query, score, score_sync) and `models`
(model, inprocess, make_client); they are re-exported by the top-level package.
"""

from .api import QueryFunction, query, run, run_sync, score, score_sync
from .decoders import DecoderSpec, argmax, beam, make_decoder, sample
from .models import ModelSpec, inprocess, make_client, model
from .result import QueryResult

__all__ = [
    "run", "run_sync", "query", "QueryFunction", "score", "score_sync", "model", "inprocess", "ModelSpec",
    "make_client", "QueryResult", "DecoderSpec", "make_decoder", "argmax", "sample", "beam",
]
