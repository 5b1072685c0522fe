"""Segment rules: a small declarative language over one table's columns.

A store owner writes a rule in the config, for example::

    rule = "rfm_segment = 'champions' and net_revenue_minor >= 10000"

:func:`parse_rule` turns the text into a small AST (frozen dataclasses, no ``eval``),
:func:`check_rule` resolves its column names and checks literal types against a
:class:`sqlalchemy.Table` without touching a database, and :func:`compile_rule` turns it into a
SQLAlchemy boolean expression in which every literal is a bound parameter (no SQL is ever built
from strings). The same expression selects the same rows on SQLite and on Postgres.

Grammar (EBNF; keywords are case-insensitive, column names are case-sensitive)::

    rule        = or_expr ;
    or_expr     = and_expr , { "or" , and_expr } ;
    and_expr    = not_expr , { "and" , not_expr } ;
    not_expr    = "not" , not_expr | primary ;
    primary     = "(" , or_expr , ")" | predicate ;
    predicate   = column , [ test ] ;            (* a column alone must be boolean *)
    test        = compare_op , value
                | [ "not" ] , "in" , "(" , value , { "," , value } , ")"
                | [ "not" ] , "between" , value , "and" , value
                | [ "not" ] , "like" , string
                | "is" , [ "not" ] , "null" ;
    compare_op  = "=" | "!=" | "<>" | "<" | "<=" | ">" | ">=" ;
    value       = number | string | "true" | "false" | now ;
    now         = "now" , "(" , ")" , [ ( "+" | "-" ) , duration ] ;
    duration    = digits , ( "d" | "h" | "w" | "m" ) ;   (* days, hours, weeks, minutes *)
    number      = [ "-" ] , digits , [ "." , digits ] ;
    string      = "'" , { any character but "'" | "''" } , "'" ;
    column      = ( letter | "_" ) , { letter | digit | "_" } ;   (* ASCII *)
    digits      = digit , { digit } ;

Reserved words (not usable as column names): and, or, not, in, between, like, is, null, true,
false, now.

Semantics:

* Precedence is ``not`` > ``and`` > ``or``; ``x between a and b`` binds its own ``and``.
* Types come from the column: number columns (Integer, Float, Numeric) take integer and decimal
  literals; string columns take strings; boolean columns take ``true``/``false`` (and may stand
  alone as a condition); datetime columns take ``now()``, ``now() - 90d``, dates
  ``'2026-01-01'`` (midnight UTC) and datetimes ``'2026-01-01T10:00:00Z'``, in general
  ``YYYY-MM-DD[(T| )HH:MM[:SS[.ffffff]]][Z|+HH:MM|-HH:MM]`` (an offset is converted to UTC; no
  offset means UTC). Numbers must lie within a signed 64-bit integer's range. Anything else is
  a :class:`RuleError`.
* ``now()`` is the ``now`` passed to :func:`compile_rule` (the recompute's as-of instant); the
  offset is computed in Python and bound as a value. Durations are at most 100 years.
* SQL NULL semantics (three-valued logic): a comparison with a null column is *unknown*, and
  only rows for which the rule is *true* are selected. So ``x != 1``, ``x not in (1, 2)``,
  ``not (x > 1)`` and ``not has_open_cart`` all leave out rows where ``x`` (or
  ``has_open_cart``) is null; ``x is null`` / ``x is not null`` test for null explicitly.
* ``like`` is case-sensitive on both databases (Postgres ``LIKE``, SQLite ``GLOB``): ``%``
  matches any run of characters, ``_`` exactly one, and a backslash makes the next character
  literal (``'100\\%'``). String ordering (``<``, ``between``) is by Unicode code point on both.
* A decimal literal compared with an integer column is compared exactly
  (``orders_count > 2.5`` is ``orders_count > 2``); with a float column it is converted to a
  double first.
* Positions in error messages and in :attr:`RuleError.position` are 0-based character offsets
  into the rule text.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Integer,
    Interval,
    Numeric,
    String,
    Table,
    TypeDecorator,
    and_,
    literal,
    not_,
    or_,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.selectable import FromClause
from sqlalchemy.sql.type_api import TypeEngine
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = [
    "MAX_DEPTH",
    "MAX_RULE_LENGTH",
    "And",
    "Between",
    "BoolColumn",
    "BoolLit",
    "ColumnRef",
    "Comparison",
    "Duration",
    "Expr",
    "InList",
    "IsNull",
    "Like",
    "Not",
    "NowLit",
    "NumberLit",
    "Or",
    "RuleError",
    "StringLit",
    "Value",
    "check_rule",
    "compile_rule",
    "parse_rule",
    "render_rule",
]

MAX_RULE_LENGTH = 4000
MAX_DEPTH = 50
_MAX_INT = 2**63 - 1  # numbers must fit a signed 64-bit integer (SQLite's and Postgres' bigint)
_MAX_DURATION = timedelta(days=36525)  # 100 years

_RESERVED = frozenset(
    {"and", "or", "not", "in", "between", "like", "is", "null", "true", "false", "now"}
)
_UNITS: dict[str, timedelta] = {
    "d": timedelta(days=1),
    "h": timedelta(hours=1),
    "w": timedelta(weeks=1),
    "m": timedelta(minutes=1),
}
CompareOp = Literal["=", "!=", "<", "<=", ">", ">="]
_COMPARE_OPS: dict[str, CompareOp] = {
    "=": "=",
    "!=": "!=",
    "<>": "!=",
    "<": "<",
    "<=": "<=",
    ">": ">",
    ">=": ">=",
}


class RuleError(ValueError):
    """A rule that cannot be parsed, names an unknown column, or compares mismatched types.

    ``str(exc)`` is a one-line message meant to follow ``segments.<name>.rule: `` in an error,
    e.g. ``"expected a value after '>=' at position 17"``. ``position`` is the 0-based offset
    into the rule text, or None when the error is about the rule as a whole.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.position = position

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# AST. ``pos`` fields (0-based offsets, for error messages) do not take part in equality.


@dataclass(frozen=True)
class ColumnRef:
    name: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class NumberLit:
    value: int | Decimal
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class StringLit:
    value: str
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class BoolLit:
    value: bool
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Duration:
    sign: Literal["+", "-"]
    amount: int
    unit: Literal["d", "h", "w", "m"]

    def delta(self) -> timedelta:
        delta = _UNITS[self.unit] * self.amount
        return delta if self.sign == "+" else -delta


@dataclass(frozen=True)
class NowLit:
    offset: Duration | None = None
    pos: int = field(default=0, compare=False)


Value = NumberLit | StringLit | BoolLit | NowLit


@dataclass(frozen=True)
class Comparison:
    column: ColumnRef
    op: CompareOp
    value: Value
    pos: int = field(default=0, compare=False)  # of the operator


@dataclass(frozen=True)
class InList:
    column: ColumnRef
    values: tuple[Value, ...]
    negated: bool = False
    pos: int = field(default=0, compare=False)  # of 'in' (or of 'not' in 'not in')


@dataclass(frozen=True)
class Between:
    column: ColumnRef
    low: Value
    high: Value
    negated: bool = False
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Like:
    column: ColumnRef
    pattern: StringLit
    negated: bool = False
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class IsNull:
    column: ColumnRef
    negated: bool = False
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class BoolColumn:
    """A boolean column used as a condition on its own, e.g. ``has_open_cart``."""

    column: ColumnRef


@dataclass(frozen=True)
class Not:
    operand: Expr
    pos: int = field(default=0, compare=False)


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]  # two or more


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]  # two or more


Expr = Comparison | InList | Between | Like | IsNull | BoolColumn | Not | And | Or


# --------------------------------------------------------------------------------------------
# Tokenizer

TokenKind = Literal["word", "number", "duration", "string", "op", "(", ")", ",", "+", "-", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: TokenKind
    text: str  # the source text of the token
    pos: int
    value: object = None  # int | Decimal for numbers, str for strings, (int, unit) for durations

    def is_keyword(self, *words: str) -> bool:
        return self.kind == "word" and self.text.lower() in words

    def shown(self) -> str:
        if self.kind == "end":
            return "end of rule"
        return self.text if self.kind == "string" else f"'{self.text}'"


_PUNCTUATION: dict[str, TokenKind] = {"(": "(", ")": ")", ",": ",", "+": "+", "-": "-"}


def _is_ident_start(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z") or c == "_"


def _is_ident_char(c: str) -> bool:
    return _is_ident_start(c) or ("0" <= c <= "9")


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif _is_ident_start(c):
            j = i + 1
            while j < n and _is_ident_char(text[j]):
                j += 1
            tokens.append(_Token("word", text[i:j], i))
            i = j
        elif _is_digit(c):
            tokens.append(_number_token(text, i))
            i += len(tokens[-1].text)
        elif c == "'":
            tokens.append(_string_token(text, i))
            i += len(tokens[-1].text)
        elif text.startswith(("<=", ">=", "!=", "<>"), i):
            tokens.append(_Token("op", text[i : i + 2], i))
            i += 2
        elif c in "=<>":
            tokens.append(_Token("op", c, i))
            i += 1
        elif c in _PUNCTUATION:
            tokens.append(_Token(_PUNCTUATION[c], c, i))
            i += 1
        elif c == '"':
            raise RuleError(f"unexpected '\"' at position {i} (strings use single quotes)", i)
        else:
            shown = c if c.isprintable() else repr(c)[1:-1]
            raise RuleError(f"unexpected character '{shown}' at position {i}", i)
    tokens.append(_Token("end", "", n))
    return tokens


def _number_token(text: str, start: int) -> _Token:
    n = len(text)
    j = start
    while j < n and _is_digit(text[j]):
        j += 1
    is_decimal = False
    if j < n and text[j] == ".":
        is_decimal = True
        j += 1
        if j >= n or not _is_digit(text[j]):
            raise RuleError(f"expected digits after '{text[start:j]}' at position {j}", j)
        while j < n and _is_digit(text[j]):
            j += 1
    if j < n and (_is_ident_char(text[j]) or text[j] == "."):
        k = j
        while k < n and (_is_ident_char(text[k]) or text[k] == "."):
            k += 1
        source = text[start:k]
        unit = text[j:k].lower()
        if is_decimal or unit not in _UNITS:
            raise RuleError(f"invalid number '{source}' at position {start}", start)
        amount = int(text[start:j])
        if amount > _MAX_DURATION // _UNITS[unit]:
            raise RuleError(
                f"duration '{source}' is longer than 100 years at position {start}", start
            )
        return _Token("duration", source, start, (amount, unit))
    source = text[start:j]
    value: int | Decimal = Decimal(source) if is_decimal else int(source)
    if abs(Decimal(value)) > _MAX_INT:
        raise RuleError(f"number {source} is out of range at position {start}", start)
    return _Token("number", source, start, value)


def _string_token(text: str, start: int) -> _Token:
    parts: list[str] = []
    i = start + 1
    while True:
        j = text.find("'", i)
        if j < 0:
            raise RuleError(f"unterminated string starting at position {start}", start)
        parts.append(text[i:j])
        if text.startswith("''", j):
            parts.append("'")
            i = j + 2
            continue
        return _Token("string", text[start : j + 1], start, "".join(parts))


# --------------------------------------------------------------------------------------------
# Parser (recursive descent; recursion is bounded by MAX_DEPTH)


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0
        self.depth = 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def advance(self) -> _Token:
        token = self.tokens[self.i]
        if token.kind != "end":
            self.i += 1
        return token

    def expected(self, what: str) -> RuleError:
        token = self.peek()
        if self.i > 0:
            prev = self.tokens[self.i - 1]
            return RuleError(
                f"expected {what} after {prev.shown()} at position {token.pos}", token.pos
            )
        return RuleError(f"expected {what} at position {token.pos}", token.pos)

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise RuleError(
                f"rule is nested deeper than {MAX_DEPTH} levels at position {token.pos}", token.pos
            )

    def parse(self) -> Expr:
        if self.peek().kind == "end":
            raise RuleError("empty rule")
        expr = self.or_expr()
        token = self.peek()
        if token.kind != "end":
            raise RuleError(f"unexpected {token.shown()} at position {token.pos}", token.pos)
        return expr

    def or_expr(self) -> Expr:
        operands = [self.and_expr()]
        while self.peek().is_keyword("or"):
            self.advance()
            operands.append(self.and_expr())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_expr(self) -> Expr:
        operands = [self.not_expr()]
        while self.peek().is_keyword("and"):
            self.advance()
            operands.append(self.not_expr())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def not_expr(self) -> Expr:
        if not self.peek().is_keyword("not"):
            return self.primary()
        token = self.advance()
        self.enter(token)
        operand = self.not_expr()
        self.depth -= 1
        return Not(operand, token.pos)

    def primary(self) -> Expr:
        token = self.peek()
        if token.kind == "(":
            self.advance()
            self.enter(token)
            expr = self.or_expr()
            closing = self.peek()
            if closing.kind == "end":
                raise RuleError(f"unclosed parenthesis opened at position {token.pos}", token.pos)
            if closing.kind != ")":
                raise RuleError(
                    f"unexpected {closing.shown()} at position {closing.pos} "
                    f"(expected ')' to close the parenthesis at position {token.pos})",
                    closing.pos,
                )
            self.advance()
            self.depth -= 1
            return expr
        if token.kind == "word" and token.text.lower() not in _RESERVED:
            self.advance()
            return self.predicate(ColumnRef(token.text, token.pos))
        raise self.expected("a column name")

    def predicate(self, column: ColumnRef) -> Expr:
        token = self.peek()
        if token.kind == "op":
            self.advance()
            return Comparison(column, _COMPARE_OPS[token.text], self.value(), token.pos)
        negated = False
        if token.is_keyword("not"):
            self.advance()
            negated = True
            if not self.peek().is_keyword("in", "between", "like"):
                raise self.expected("'in', 'between' or 'like'")
        keyword = self.peek()
        if keyword.is_keyword("in"):
            self.advance()
            return InList(column, self.value_list(keyword), negated, token.pos)
        if keyword.is_keyword("between"):
            self.advance()
            low = self.value()
            if not self.peek().is_keyword("and"):
                raise self.expected("'and'")
            self.advance()
            return Between(column, low, self.value(), negated, token.pos)
        if keyword.is_keyword("like"):
            self.advance()
            pattern = self.peek()
            if pattern.kind != "string":
                raise self.expected("a string pattern")
            self.advance()
            assert isinstance(pattern.value, str)
            _like_parts(pattern.value, pattern.pos)  # validates escapes
            return Like(column, StringLit(pattern.value, pattern.pos), negated, token.pos)
        if keyword.is_keyword("is"):
            self.advance()
            is_not = self.peek().is_keyword("not")
            if is_not:
                self.advance()
            if not self.peek().is_keyword("null"):
                raise self.expected("'null'")
            self.advance()
            return IsNull(column, is_not, token.pos)
        return BoolColumn(column)

    def value_list(self, keyword: _Token) -> tuple[Value, ...]:
        opening = self.peek()
        if opening.kind != "(":
            raise self.expected("'('")
        self.advance()
        if self.peek().kind == ")":
            raise RuleError(
                f"empty list after {keyword.shown()} at position {opening.pos}",
                opening.pos,
            )
        values = [self.value()]
        while True:
            token = self.peek()
            if token.kind == ")":
                self.advance()
                return tuple(values)
            if token.kind != ",":
                if token.kind == "end":
                    raise RuleError(
                        f"unclosed parenthesis opened at position {opening.pos}", opening.pos
                    )
                raise RuleError(f"expected ',' or ')' at position {token.pos}", token.pos)
            self.advance()
            values.append(self.value())

    def value(self) -> Value:
        token = self.peek()
        if token.kind == "number":
            self.advance()
            assert isinstance(token.value, int | Decimal)
            return NumberLit(token.value, token.pos)
        if token.kind == "-" and self.peek(1).kind == "number":
            self.advance()
            number = self.advance()
            assert isinstance(number.value, int | Decimal)
            return NumberLit(-number.value, token.pos)
        if token.kind == "string":
            self.advance()
            assert isinstance(token.value, str)
            return StringLit(token.value, token.pos)
        if token.is_keyword("true", "false"):
            self.advance()
            return BoolLit(token.text.lower() == "true", token.pos)
        if token.is_keyword("null"):
            raise RuleError(
                f"use 'is null' or 'is not null' to test for null at position {token.pos}",
                token.pos,
            )
        if token.is_keyword("now"):
            return self.now()
        if token.kind == "duration":
            raise RuleError(
                f"unexpected duration '{token.text}' at position {token.pos} "
                "(a duration follows 'now() -' or 'now() +')",
                token.pos,
            )
        raise self.expected("a value")

    def now(self) -> NowLit:
        token = self.advance()
        if self.peek().kind != "(":
            raise self.expected("'('")
        self.advance()
        if self.peek().kind != ")":
            raise self.expected("')'")
        self.advance()
        sign = self.peek()
        if sign.kind not in ("+", "-"):
            return NowLit(None, token.pos)
        self.advance()
        duration = self.peek()
        if duration.kind != "duration":
            raise self.expected("a duration like '90d'")
        self.advance()
        assert isinstance(duration.value, tuple)
        amount, unit = duration.value
        return NowLit(Duration("+" if sign.kind == "+" else "-", amount, unit), token.pos)


def parse_rule(text: str) -> Expr:
    """Parse a rule into its AST; raises :class:`RuleError` on a syntax error."""
    if len(text) > MAX_RULE_LENGTH:
        raise RuleError(f"rule is longer than {MAX_RULE_LENGTH} characters ({len(text)})")
    return _Parser(_tokenize(text)).parse()


# --------------------------------------------------------------------------------------------
# Rendering: the canonical text of an AST; parse_rule(render_rule(e)) == e.


def _render_value(value: Value) -> str:
    if isinstance(value, NumberLit):
        return str(value.value)
    if isinstance(value, StringLit):
        return "'" + value.value.replace("'", "''") + "'"
    if isinstance(value, BoolLit):
        return "true" if value.value else "false"
    if value.offset is None:
        return "now()"
    offset = value.offset
    return f"now() {offset.sign} {offset.amount}{offset.unit}"


def render_rule(expr: Expr) -> str:
    """The canonical text of a rule: lower-case keywords, single spaces, minimal parentheses."""
    if isinstance(expr, Comparison):
        return f"{expr.column.name} {expr.op} {_render_value(expr.value)}"
    if isinstance(expr, InList):
        values = ", ".join(_render_value(v) for v in expr.values)
        return f"{expr.column.name} {'not ' if expr.negated else ''}in ({values})"
    if isinstance(expr, Between):
        low, high = _render_value(expr.low), _render_value(expr.high)
        return f"{expr.column.name} {'not ' if expr.negated else ''}between {low} and {high}"
    if isinstance(expr, Like):
        pattern = _render_value(expr.pattern)
        return f"{expr.column.name} {'not ' if expr.negated else ''}like {pattern}"
    if isinstance(expr, IsNull):
        return f"{expr.column.name} is {'not ' if expr.negated else ''}null"
    if isinstance(expr, BoolColumn):
        return expr.column.name
    if isinstance(expr, Not):
        inner = render_rule(expr.operand)
        return f"not ({inner})" if isinstance(expr.operand, And | Or) else f"not {inner}"
    if isinstance(expr, And):
        return " and ".join(
            f"({render_rule(e)})" if isinstance(e, And | Or) else render_rule(e)
            for e in expr.operands
        )
    return " or ".join(
        f"({render_rule(e)})" if isinstance(e, Or) else render_rule(e) for e in expr.operands
    )


# --------------------------------------------------------------------------------------------
# like patterns: '%' any run, '_' one character, '\' makes the next character literal.

_LikePart = tuple[Literal["any", "one", "char"], str]


def _like_parts(pattern: str, pos: int) -> list[_LikePart]:
    parts: list[_LikePart] = []
    chars = iter(pattern)
    for c in chars:
        if c == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise RuleError(
                    f"like pattern at position {pos} ends with an unfinished escape '\\'", pos
                )
            parts.append(("char", escaped))
        elif c == "%":
            parts.append(("any", c))
        elif c == "_":
            parts.append(("one", c))
        else:
            parts.append(("char", c))
    return parts


def _sql_like_pattern(parts: list[_LikePart]) -> str:
    """For LIKE ... ESCAPE '/'."""
    out = []
    for kind, c in parts:
        if kind == "any":
            out.append("%")
        elif kind == "one":
            out.append("_")
        else:
            out.append("/" + c if c in "%_/" else c)
    return "".join(out)


def _glob_pattern(parts: list[_LikePart]) -> str:
    """For SQLite's GLOB, which is case-sensitive (SQLite's LIKE is not)."""
    out = []
    for kind, c in parts:
        if kind == "any":
            out.append("*")
        elif kind == "one":
            out.append("?")
        else:
            out.append(f"[{c}]" if c in "*?[" else c)
    return "".join(out)


class _RuleLike(ColumnElement[bool]):
    """``column LIKE pattern ESCAPE '/'``, as ``column GLOB pattern`` on SQLite."""

    __visit_name__ = "syncd_rule_like"
    inherit_cache = False  # the bind parameter differs per dialect: compile afresh
    _traverse_internals = [  # noqa: RUF012
        ("column", InternalTraversal.dp_clauseelement),
        ("like_param", InternalTraversal.dp_clauseelement),
        ("glob_param", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: ColumnElement[Any], parts: list[_LikePart]) -> None:
        self.column = column
        self.like_param: BindParameter[str] = literal(_sql_like_pattern(parts), String())
        self.glob_param: BindParameter[str] = literal(_glob_pattern(parts), String())
        self.type = Boolean()

    @property
    def _from_objects(self) -> list[FromClause]:
        return self.column._from_objects


@compiles(_RuleLike)
def _compile_like(element: _RuleLike, compiler: SQLCompiler, **kw: Any) -> str:
    like = element.column.like(element.like_param, escape="/")
    return "(" + compiler.process(like, **kw) + ")"


@compiles(_RuleLike, "sqlite")
def _compile_like_sqlite(element: _RuleLike, compiler: SQLCompiler, **kw: Any) -> str:
    glob = element.column.op("GLOB", is_comparison=True)(element.glob_param)
    return "(" + compiler.process(glob, **kw) + ")"


class _CodepointOrder(ColumnElement[str]):
    """A string column compared by code point: ``COLLATE "C"`` on Postgres, whose database
    collation may be a locale's; SQLite's default BINARY collation already is."""

    __visit_name__ = "syncd_codepoint_order"
    inherit_cache = False
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[str]) -> None:
        self.column = column
        self.type = column.type

    @property
    def _from_objects(self) -> list[FromClause]:
        return self.column._from_objects


@compiles(_CodepointOrder)
def _compile_codepoint(element: _CodepointOrder, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_CodepointOrder, "postgresql")
def _compile_codepoint_pg(element: _CodepointOrder, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw) + ' COLLATE "C"'


# --------------------------------------------------------------------------------------------
# Binding names to columns, checking types, building the SQLAlchemy expression.

_Kind = Literal["integer", "float", "decimal", "string", "boolean", "datetime"]
_KIND_NAMES: dict[_Kind, str] = {
    "integer": "number",
    "float": "number",
    "decimal": "number",
    "string": "string",
    "boolean": "boolean",
    "datetime": "datetime",
}
_DATETIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?([Zz]|[+-]\d{2}:\d{2})?)?"
)


def _base_type(type_: TypeEngine[Any]) -> TypeEngine[Any]:
    while isinstance(type_, TypeDecorator) and not isinstance(type_, Interval):
        type_ = type_.impl_instance
    return type_


def _column_kind(column: ColumnElement[Any]) -> _Kind | None:
    base = _base_type(column.type)
    if isinstance(base, Boolean):
        return "boolean"
    if isinstance(base, Integer):
        return "integer"
    if isinstance(base, Float):
        return "float"
    if isinstance(base, Numeric):
        return "decimal"
    if isinstance(base, DateTime):
        return "datetime"
    if isinstance(base, String):
        return "string"
    return None


def _parse_datetime(text: str) -> datetime | None:
    match = _DATETIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        tz = UTC
        if zone and zone not in ("Z", "z"):
            sign = 1 if zone[0] == "+" else -1
            offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
            tz = timezone(sign * offset)
        value = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0").ljust(6, "0")),
            tzinfo=tz,
        )
        return value.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _describe(value: Value) -> str:
    if isinstance(value, NumberLit):
        return f"number {_render_value(value)}"
    if isinstance(value, StringLit):
        return f"string {_render_value(value)}"
    if isinstance(value, BoolLit):
        return f"boolean {_render_value(value)}"
    return _render_value(value)


_ORDERING: frozenset[str] = frozenset({"<", "<=", ">", ">="})


class _Compiler:
    def __init__(self, table: Table, now: datetime) -> None:
        self.table = table
        self.now = now

    def column(self, ref: ColumnRef) -> tuple[ColumnElement[Any], _Kind]:
        columns = self.table.c
        if ref.name not in columns:
            names = sorted(columns.keys())
            lowered = {name.lower(): name for name in names}
            close = difflib.get_close_matches(ref.name.lower(), list(lowered), n=1, cutoff=0.6)
            hint = f", did you mean '{lowered[close[0]]}'?" if close else ""
            raise RuleError(
                f"unknown column '{ref.name}'{hint} (columns: {', '.join(names)})", ref.pos
            )
        column: ColumnElement[Any] = columns[ref.name]
        kind = _column_kind(column)
        if kind is None:
            raise RuleError(
                f"column '{ref.name}' has type {column.type}, which rules cannot use "
                f"(at position {ref.pos})",
                ref.pos,
            )
        return column, kind

    def value(self, column: ColumnElement[Any], kind: _Kind, ref: ColumnRef, value: Value) -> Any:
        """The Python value to bind for ``value`` compared with ``column``."""
        if kind in ("integer", "float", "decimal") and isinstance(value, NumberLit):
            return value.value
        if kind == "string" and isinstance(value, StringLit):
            return value.value
        if kind == "boolean" and isinstance(value, BoolLit):
            return value.value
        if kind == "datetime" and isinstance(value, NowLit):
            now = self.now
            return now if value.offset is None else now + value.offset.delta()
        if kind == "datetime" and isinstance(value, StringLit):
            parsed = _parse_datetime(value.value)
            if parsed is None:
                raise RuleError(
                    f"invalid date {_render_value(value)} at position {value.pos} "
                    "(expected 'YYYY-MM-DD' or 'YYYY-MM-DDTHH:MM:SSZ')",
                    value.pos,
                )
            return parsed
        raise RuleError(
            f"cannot compare {_KIND_NAMES[kind]} column '{ref.name}' with "
            f"{_describe(value)} at position {value.pos}",
            value.pos,
        )

    def bind(
        self, column: ColumnElement[Any], kind: _Kind, python_value: Any
    ) -> BindParameter[Any]:
        if kind == "integer":
            return literal(python_value, BigInteger())
        if kind == "float":
            return literal(float(python_value), Float())
        if kind == "decimal":
            return literal(Decimal(python_value), Numeric())
        if kind == "boolean":
            return literal(python_value, Boolean())
        if kind == "string":
            return literal(python_value, String())  # not the column's type: its collation
        base = _base_type(column.type)
        assert isinstance(base, DateTime)
        if not isinstance(column.type, TypeDecorator) and not base.timezone:
            python_value = python_value.replace(tzinfo=None)  # naive UTC column
        return literal(python_value, column.type)  # e.g. UTCDateTime's SQLite text format

    def refuse(self, keyword: str, kind: _Kind, ref: ColumnRef, pos: int) -> RuleError:
        return RuleError(
            f"cannot use '{keyword}' on {_KIND_NAMES[kind]} column '{ref.name}' at position {pos}",
            pos,
        )

    def compile(self, expr: Expr) -> ColumnElement[bool]:
        if isinstance(expr, And):
            return and_(*(self.compile(e) for e in expr.operands))
        if isinstance(expr, Or):
            return or_(*(self.compile(e) for e in expr.operands))
        if isinstance(expr, Not):
            return not_(self.compile(expr.operand))
        column, kind = self.column(expr.column)
        ref = expr.column
        if isinstance(expr, BoolColumn):
            if kind != "boolean":
                end = ref.pos + len(ref.name)
                raise RuleError(
                    f"expected a comparison after {_KIND_NAMES[kind]} column '{ref.name}' "
                    f"at position {end}",
                    end,
                )
            return column
        if isinstance(expr, IsNull):
            return column.is_not(None) if expr.negated else column.is_(None)
        if isinstance(expr, Like):
            if kind != "string":
                raise self.refuse("like", kind, ref, expr.pos)
            like = _RuleLike(column, _like_parts(expr.pattern.value, expr.pattern.pos))
            return not_(like) if expr.negated else like
        if isinstance(expr, Comparison):
            if kind == "boolean" and expr.op in _ORDERING:
                raise self.refuse(expr.op, kind, ref, expr.pos)
            value = self.value(column, kind, ref, expr.value)
            if kind == "integer" and isinstance(value, Decimal):
                return self.integer_comparison(column, expr.op, value)
            return self.operate(column, kind, expr.op, self.bind(column, kind, value))
        if isinstance(expr, InList):
            values = [self.value(column, kind, ref, v) for v in expr.values]
            if kind == "integer":
                values = [int(v) for v in values if v == int(v)]  # 2.5 never equals an integer
                if not values:  # false, or null when the column is null
                    return (column == column) if expr.negated else (column != column)
            binds = [self.bind(column, kind, v) for v in values]
            return column.not_in(binds) if expr.negated else column.in_(binds)
        # Between
        if kind == "boolean":
            raise self.refuse("between", kind, ref, expr.pos)
        low = self.value(column, kind, ref, expr.low)
        high = self.value(column, kind, ref, expr.high)
        if kind == "integer":
            low, high = math.ceil(low), math.floor(high)
        target = _CodepointOrder(column) if kind == "string" else column
        between = target.between(self.bind(column, kind, low), self.bind(column, kind, high))
        return not_(between) if expr.negated else between

    def operate(
        self, column: ColumnElement[Any], kind: _Kind, op: CompareOp, bound: BindParameter[Any]
    ) -> ColumnElement[bool]:
        if op == "=":
            return column == bound
        if op == "!=":
            return column != bound
        target = _CodepointOrder(column) if kind == "string" else column
        if op == "<":
            return target < bound
        if op == "<=":
            return target <= bound
        if op == ">":
            return target > bound
        return target >= bound

    def integer_comparison(
        self, column: ColumnElement[Any], op: CompareOp, value: Decimal
    ) -> ColumnElement[bool]:
        """An integer column against a decimal, exactly: ``x > 2.5`` is ``x > 2``."""
        if value == int(value):
            return self.operate(column, "integer", op, self.bind(column, "integer", int(value)))
        if op == "=":  # never true; null when the column is null
            return column != column
        if op == "!=":
            return column == column
        bound = math.floor(value) if op in (">", "<=") else math.ceil(value)
        return self.operate(column, "integer", op, self.bind(column, "integer", bound))


def compile_rule(text: str, table: Table, *, now: datetime) -> ColumnElement[bool]:
    """The rule as a SQLAlchemy boolean expression over ``table``, every literal bound.

    ``now`` (timezone-aware) is the instant ``now()`` stands for. Raises :class:`RuleError`.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be a timezone-aware datetime, got {now!r}")
    return _Compiler(table, now.astimezone(UTC)).compile(parse_rule(text))


def check_rule(text: str, table: Table) -> None:
    """Parse the rule and check its columns and literal types against ``table``, without a
    database. Raises :class:`RuleError`."""
    compile_rule(text, table, now=datetime.now(UTC))
