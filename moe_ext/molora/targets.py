"""The target_modules regex guard. A string target_modules is, as in PEFT, a regex that must
match a whole module name; Python's re backtracks, so a pattern such as "(.*)*x" from a
downloaded adapter config would take hours against every module name. check_target_regex
refuses, before any matching, the patterns whose matching time can grow faster than the
cube of the name's length:
  - a quantifier over something that itself holds a quantifier or an alternation
    ("(a+)+", "(.*)*", "(a|ab)*": exponential backtracking);
  - more than MAX_DEGREE quantifiers one after another (".*.*.*.*x": polynomial of that
    degree); alternatives count as the costliest one;
  - backreferences and conditionals (no bound at all); a lookaround counts as what it
    holds;
  - patterns longer than MAX_PATTERN characters.
Every pattern that a person or PEFT writes for target_modules passes
("model\\.layers\\.\\d+\\.self_attn\\.(q_proj|v_proj)", ".*\\.(q|k|v)_proj")."""
from __future__ import annotations

try:  # the parser of Python's own re (3.11+: re._parser; before: sre_parse)
    from re import _parser as sre_parse
    from re import _constants as sre_constants
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants
    import sre_parse

MAX_DEGREE = 3
MAX_PATTERN = 10_000

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
if hasattr(sre_constants, "POSSESSIVE_REPEAT"):
    _REPEATS.add(sre_constants.POSSESSIVE_REPEAT)
_UNBOUNDED = {sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS}
_ASSERTS = {sre_constants.ASSERT, sre_constants.ASSERT_NOT}
_SINGLE = {sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.ANY, sre_constants.IN,
           sre_constants.CATEGORY}


class UnsafeRegex(ValueError):
    """A target_modules regex refused by check_target_regex."""


def _items(node) -> list:
    """The (op, av) items of a parsed subpattern (SubPattern or list)."""
    return list(node.data) if hasattr(node, "data") else list(node)


def _nested(op, av) -> list:
    """The subpatterns directly inside one item."""
    if op in _REPEATS:
        return [av[2]]
    if op == sre_constants.SUBPATTERN:
        return [av[-1]]
    if op == sre_constants.BRANCH:
        return list(av[1])
    if op in _ASSERTS:
        return [av[1]]
    if getattr(sre_constants, "ATOMIC_GROUP", None) == op:
        return [av]
    return []


def _has_choice(node) -> bool:
    """Whether a subpattern holds a quantifier (other than an exact count) or an alternation."""
    for op, av in _items(node):
        if op in _REPEATS and av[0] != av[1]:
            return True
        if op == sre_constants.BRANCH:
            return True
        if any(_has_choice(sub) for sub in _nested(op, av)):
            return True
    return False


def _degree(node, pattern: str) -> int:
    """How many quantifiers the worst path through `node` puts one after another (the
    degree of the polynomial bounding its backtracking); UnsafeRegex for the constructs
    without a bound."""
    total = 0
    for op, av in _items(node):
        if op in _UNBOUNDED:
            raise UnsafeRegex(f"target_modules regex {pattern!r}: backreferences and "
                              f"conditionals are not allowed")
        if op in _REPEATS:
            low, high, body = av
            if _has_choice(body):
                raise UnsafeRegex(f"target_modules regex {pattern!r}: a quantifier over a group "
                                  f"that holds a quantifier or an alternation can take "
                                  f"exponential time; write it without the nesting")
            if high != low:
                total += 1
        elif op == sre_constants.BRANCH:
            total += max(_degree(alt, pattern) for alt in av[1])
        else:
            total += sum(_degree(sub, pattern) for sub in _nested(op, av))
    return total


def check_target_regex(pattern: str) -> None:
    """UnsafeRegex (a ValueError naming target_modules and the pattern) unless `pattern`
    compiles and is safe to full-match against module names (see the module docstring)."""
    if len(pattern) > MAX_PATTERN:
        raise UnsafeRegex(f"target_modules regex of {len(pattern)} characters: at most "
                          f"{MAX_PATTERN}")
    try:
        parsed = sre_parse.parse(pattern)
    except Exception as err:  # re.error, and RecursionError for absurd nesting
        raise UnsafeRegex(f"target_modules {pattern!r} is not a valid regex ({err})") from None
    degree = _degree(parsed, pattern)
    if degree > MAX_DEGREE:
        raise UnsafeRegex(f"target_modules regex {pattern!r}: {degree} quantifiers in a row can "
                          f"take time of degree {degree} in the name's length; at most "
                          f"{MAX_DEGREE}")
