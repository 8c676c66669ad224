"""Command-line flags from a dataclass, CleanRL-style: one field per flag, its docstring the help.

    @dataclass
    class Args:
        lr: float = 1e-5
        '''Adam learning rate'''
    args = parse_dataclass(Args, ranges={"lr": "positive"})   # --lr 3e-5; --help lists every field

Fields become `--kebab-case` flags typed like their defaults; booleans get `--x / --no-x`. Each
flag is declared once, in its dataclass (train.py's Args; bench.py reuses it). A value outside
its choices or range stops the program before anything runs, with one line that names the
flag, the value and what would be valid, and no traceback.
"""

import argparse
import ast
import dataclasses
import inspect

# The valid ranges a flag can be given: name -> test.
RANGES = {
    "positive": lambda v: v > 0,
    "non-negative": lambda v: v >= 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "greater than 1": lambda v: v > 1,
    "0 (the model's own) or at least 28": lambda v: v == 0 or v >= 28,
    "-1 (the sampling temperature) or non-negative": lambda v: v == -1 or v >= 0,
    "-1 (the sampling temperature) or positive": lambda v: v == -1 or v > 0,
    "-1 (auto) or non-negative": lambda v: v == -1 or v >= 0,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of the usage block: what is wrong and what would be valid."""
        self.exit(2, f"{self.prog}: {message}\n")


def parse_dataclass(cls, argv=None, description=None, choices=None, ranges=None, defaults=None):
    """Command-line flags from a dataclass's fields; each field's docstring is its --help text.
    `choices` ({field: valid values}) and `ranges` ({field: a key of RANGES}) make the parser
    refuse anything else, naming the flag, its value and what is valid. `defaults` ({field:
    value}) replaces fields' defaults, e.g. per environment: a flag given explicitly still wins."""
    helps = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass adds fields
        body = ast.parse(inspect.getsource(klass)).body[0].body
        helps |= {node.target.id: body[i + 1].value.value for i, node in enumerate(body[:-1])
                  if isinstance(node, ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)}
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=text, choices=(choices or {}).get(f.name))
    parser.set_defaults(**(defaults or {}))
    args = cls(**vars(parser.parse_args(argv)))
    for name, valid in (ranges or {}).items():
        value = getattr(args, name)
        if not RANGES[valid](value):
            parser.error(f"argument --{name.replace('_', '-')}: {value!r} is not valid; it must be {valid}")
    return args
