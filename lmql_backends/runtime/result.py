"""What a query returns."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class QueryResult:
    """One result of a query.

    prompt: the whole prompt text with every hole replaced by its value (without the BOS text).
    variables: the last value of each variable (``int`` for INT variables); with a distribution
        clause also ``"P(VAR)"`` and ``"log P(VAR)"``: ``(option, p)`` lists in option order.
    distribution_variable, distribution_values: the distribution clause's variable and options.
    is_truncated: the query stopped early because it reached ``max_len`` tokens.
    return_value: what the program returned (``return X``), None without a return statement;
        `run` returns it in place of the QueryResult, as LMQL does.
    """

    prompt: str
    variables: dict[str, Any]
    distribution_variable: str | None = None
    distribution_values: list[str] | None = None
    is_truncated: bool = False
    return_value: Any = None
