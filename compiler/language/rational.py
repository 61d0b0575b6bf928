"""Exact rational numbers written the way gear trains are: `223/19`, `13.368`, `(38/64)*(48/24)`.

A gear ratio is a quotient of tooth counts; a float would lose the identity that makes two paths
through a mechanism agree. The grammar below is the whole language; it is parsed by recursive
descent over a token list and can only ever produce a `fractions.Fraction`. Nothing is evaluated.

    expr   := factor (("*" | "/") factor)*
    factor := "-"? atom
    atom   := NUMBER | "(" expr ")"
    NUMBER := DIGITS ("." DIGITS?)? | "." DIGITS

Limits (length, nesting, digits, size of the result) keep a hostile ratio from costing anything.
The size bound holds for every exact rational the compiler keeps, written or derived (a gear's
velocity is a product along its train): numerator and denominator of at most `MAX_BITS` bits, so
any such value converts to a finite, non-zero float (2**±256 is far inside a double's range).
A number written with an exponent (`1e-99999999`, which YAML reads as a float) is refused by its
exponent before any exact value is built, since `Fraction` would build 10**99999999 first.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, PlainSerializer, WithJsonSchema
from pydantic_core import PydanticCustomError

MAX_TEXT = 200
MAX_NESTING = 16
MAX_DIGITS = 30
MAX_BITS = 256
# Past this decimal exponent no number of MAX_DIGITS digits has a value within MAX_BITS bits
# (10**-90 needs 299), so the exponent alone refuses it, before 10**exponent is ever built.
MAX_EXPONENT = 120

_DECIMAL = re.compile(r"^[-+]?(?P<digits>[0-9]*\.?[0-9]*)(?:[eE](?P<exponent>[-+]?[0-9]+))?$")

_TOKEN = re.compile(r"\s*(?:(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)|(?P<op>[*/()\-]))")


class RationalSyntaxError(ValueError):
    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.message = message
        self.offset = offset


def parse_rational(text: str) -> Fraction:
    """Parse `text` by the grammar above; raise `RationalSyntaxError` naming the offending offset."""
    if len(text) > MAX_TEXT:
        raise RationalSyntaxError(
            f"a ratio of {len(text)} characters is too long (at most {MAX_TEXT})", 0
        )
    tokens = _tokenize(text)
    parser = _Parser(tokens, len(text))
    value = parser.expr(depth=0)
    if parser.pos != len(tokens):
        kind, token, offset = tokens[parser.pos]
        raise RationalSyntaxError(f"unexpected `{token}`", offset)
    return value


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    stripped_end = len(text.rstrip())
    while pos < stripped_end:
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            offset = pos + (len(text[pos:]) - len(text[pos:].lstrip()))
            raise RationalSyntaxError(f"unexpected character `{text[offset]}`", offset)
        kind = "number" if match.group("number") is not None else "op"
        token = match.group(kind)
        if kind == "number" and len(token.replace(".", "")) > MAX_DIGITS:
            raise RationalSyntaxError(
                f"a number with more than {MAX_DIGITS} digits", match.start(kind)
            )
        tokens.append((kind, token, match.start(kind)))
        pos = match.end()
    if not tokens:
        raise RationalSyntaxError("an empty ratio", 0)
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]], length: int):
        self.tokens = tokens
        self.pos = 0
        self.length = length

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def expr(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while (token := self.peek()) is not None and token[1] in "*/":
            self.pos += 1
            right = self.factor(depth)
            if token[1] == "*":
                value = value * right
            else:
                if right == 0:
                    raise RationalSyntaxError("division by zero", token[2])
                value = value / right
            _check_size(value, token[2])
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.peek()
        if token is not None and token[1] == "-":
            self.pos += 1
            return -self.atom(depth)
        return self.atom(depth)

    def atom(self, depth: int) -> Fraction:
        token = self.peek()
        if token is None:
            raise RationalSyntaxError("the ratio ends where a number was expected", self.length)
        kind, text, offset = token
        if kind == "number":
            self.pos += 1
            return Fraction(text if not text.endswith(".") else text[:-1])
        if text == "(":
            if depth >= MAX_NESTING:
                raise RationalSyntaxError(f"parentheses nested deeper than {MAX_NESTING}", offset)
            self.pos += 1
            value = self.expr(depth + 1)
            closing = self.peek()
            if closing is None or closing[1] != ")":
                raise RationalSyntaxError("missing `)`", closing[2] if closing else self.length)
            self.pos += 1
            return value
        raise RationalSyntaxError(f"unexpected `{text}` where a number was expected", offset)


def _check_size(value: Fraction, offset: int) -> None:
    problem = size_problem(value)
    if problem is not None:
        raise RationalSyntaxError(f"the ratio {problem}", offset)


def size_problem(value: Fraction) -> str | None:
    """Why `value` is beyond the size every exact rational is held to, or None if it is within.

    Worded to follow "the ratio" or "the velocity": callers name the quantity."""
    bits = max(abs(value.numerator).bit_length(), value.denominator.bit_length())
    if bits <= MAX_BITS:
        return None
    return (
        f"needs a numerator or denominator of {bits} bits, more than the {MAX_BITS} allowed "
        f"(about {MAX_BITS * 30103 // 100000} decimal digits)"
    )


def _decimal_problem(text: str) -> str | None:
    """A float's text is refused on its digits and exponent before it becomes a `Fraction`."""
    match = _DECIMAL.match(text.strip())
    if match is None:
        return None
    digits = len(match["digits"].replace(".", "").lstrip("0"))
    if digits > MAX_DIGITS:
        return f"a number with more than {MAX_DIGITS} digits"
    exponent = match["exponent"]
    if exponent is not None and (len(exponent) > 6 or abs(int(exponent)) > MAX_EXPONENT):
        return (
            f"an exponent beyond ±{MAX_EXPONENT}: a ratio must fit a numerator and denominator "
            f"of {MAX_BITS} bits"
        )
    return None


def _bounded(value: Fraction, text: str) -> Fraction:
    problem = size_problem(value)
    if problem is not None:
        raise PydanticCustomError(
            "rational_size",
            "the ratio `{text}` {problem}",
            {"text": _shown(text), "problem": problem},
        )
    return value


def _shown(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:37]}..."


def to_rational(value: Any) -> Fraction:
    """Pydantic's view of a rational field: numbers as written, or the grammar's strings."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool):
        raise PydanticCustomError(
            "rational_type", "expected a ratio such as `223/19` or `13.368`, got a boolean"
        )
    if isinstance(value, int):
        return _bounded(Fraction(value), str(value))  # the reader bounds an integer's digits
    if isinstance(value, float):
        text = getattr(value, "text", None) or repr(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise PydanticCustomError(
                "rational_finite",
                "a ratio must be a finite number, got `{text}`",
                {"text": _shown(text)},
            )
        problem = _decimal_problem(text)
        if problem is not None:
            raise PydanticCustomError(
                "rational_syntax",
                "invalid ratio `{text}`: {problem}",
                {"text": _shown(text), "problem": problem},
            )
        try:
            exact = Fraction(text)
        except (ValueError, ZeroDivisionError):
            exact = Fraction(value)
        return _bounded(exact, text)
    if isinstance(value, str):
        try:
            return parse_rational(value)
        except RationalSyntaxError as exc:
            raise PydanticCustomError(
                "rational_syntax",
                "invalid ratio `{text}`: {problem} (at character {offset})",
                {"text": _shown(value), "problem": exc.message, "offset": exc.offset + 1},
            ) from None
    raise PydanticCustomError(
        "rational_type",
        "expected a ratio such as `223/19` or `13.368`, got {type}",
        {"type": type(value).__name__},
    )


def _positive(value: Fraction) -> Fraction:
    if value <= 0:
        raise PydanticCustomError(
            "rational_positive", "a ratio must be positive, got {value}", {"value": str(value)}
        )
    return value


Rational = Annotated[
    Fraction,
    BeforeValidator(to_rational),
    PlainSerializer(lambda f: str(f), return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number"},
                {"type": "string", "pattern": r"^[0-9.()*/\- ]+$"},
            ],
            "description": "An exact ratio: a number (`13.368`) or a quotient of tooth counts (`223/19`).",
        }
    ),
]

PositiveRational = Annotated[Rational, AfterValidator(_positive)]
