"""The metrics a PromQL expression reads: its vector selectors, found by a small lexer.

`selectors(expr)` returns each `name{matchers}` the expression selects, so a test can ask a
real Prometheus whether that selector has series. What is not a metric is skipped: strings,
numbers and durations, function and aggregation names (an identifier followed by `(`),
keywords and binary operators, the label lists of `by`/`without`/`on`/`ignoring`/
`group_left`/`group_right`, label names inside `{...}`, and range or subquery brackets
(`[5m]`, `[1h:1m]`). `histogram_quantile(0.99, rate(x_bucket[5m]))` yields `x_bucket`, the
series that must exist. A selector without a name (`{__name__="x", ...}`) yields its
`__name__`. Grafana variables must be substituted first (`substitute`); anything the lexer
does not know raises ValueError, so a new syntax fails a test instead of hiding a metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    |(?P<duration>(?:\d+(?:ms|[smhdwy]))+)(?![\w.])
    |(?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    |(?P<ident>[a-zA-Z_:][\w:]*)
    |(?P<punct>==|!=|<=|>=|=~|!~|[-+*/%^<>=(){}\[\],@])
    """,
    re.VERBOSE,
)
# Followed by a parenthesised list of label names, which are not metrics.
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"offset", "bool", "and", "or", "unless", "atan2", "inf", "nan"})
GRAFANA_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class Selector:
    """One vector selector: a metric name and its label matchers as written (may be '')."""

    name: str
    matchers: str

    def promql(self) -> str:
        return f"{self.name}{{{self.matchers}}}" if self.matchers else self.name


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana variables (`$x`, `${x}`, `${x:fmt}`) by `values`; unknown ones raise."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise ValueError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return GRAFANA_VARIABLE.sub(value, expr)


def tokenize(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of every token but white space and comments."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int, opening: str, closing: str) -> int:
    """Index of the token closing the bracket at `start`."""
    depth = 0
    for index in range(start, len(tokens)):
        text = tokens[index][1]
        if tokens[index][0] != "punct":
            continue
        if text == opening:
            depth += 1
        elif text == closing:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced {opening!r} in {' '.join(t for _, t in tokens)!r}")


def _matchers(tokens: list[tuple[str, str]]) -> str:
    """The text of label matchers, one `name op "value"` per comma."""
    return "".join(text if text != "," else ", " for _, text in tokens)


def selectors(expr: str) -> list[Selector]:
    """Every vector selector of `expr`, in order of appearance."""
    tokens = tokenize(expr)
    found: list[Selector] = []
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "punct" and text == "[":  # range or subquery: durations only
            index = _closing(tokens, index, "[", "]") + 1
            continue
        if kind == "punct" and text == "{":  # a selector without a name before its braces
            end = _closing(tokens, index, "{", "}")
            inner = tokens[index + 1 : end]
            names = [
                inner[i + 2][1][1:-1]
                for i in range(len(inner) - 2)
                if inner[i][1] == "__name__" and inner[i + 1][1] == "="
            ]
            if not names:
                raise ValueError(f"selector without a metric name in {expr!r}")
            found.append(Selector(names[0], _matchers(inner)))
            index = end + 1
            continue
        if kind != "ident":
            index += 1
            continue
        word = text.lower()
        if word in GROUPING:
            if following == "(":
                index = _closing(tokens, index + 1, "(", ")") + 1
            else:
                index += 1
            continue
        if word in KEYWORDS or following == "(" or following.lower() in ("by", "without"):
            index += 1  # a keyword, function or aggregation (`sum by (x) (...)`)
            continue
        if following == "{":
            end = _closing(tokens, index + 1, "{", "}")
            found.append(Selector(text, _matchers(tokens[index + 2 : end])))
            index = end + 1
        else:
            found.append(Selector(text, ""))
            index += 1
    return found
