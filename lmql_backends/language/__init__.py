"""The query language: parsing queries (parser), query strings (qstrings), the prompt program."""

from .parser import DecoderClause, DistributionClause, Expression, Query, parse_query
from .program import FilledHole, HoleContext, ProgramTrace, PromptProgram, PromptStatement, StopProgram
from .qstrings import Hole, Interpolation, Template, Text, parse_template

__all__ = [
    "parse_query", "Query", "DecoderClause", "DistributionClause", "Expression", "PromptProgram",
    "HoleContext", "FilledHole", "ProgramTrace", "StopProgram", "PromptStatement", "parse_template", "Template", "Text",
    "Hole", "Interpolation",
]
