"""Command-line flags from a dataclass, CleanRL-style: one field per flag, its docstring the help.

    @dataclass
    class Args:
        lr: float = 1e-5
        '''Adam learning rate'''
        guidance: Literal["none", "sft", "kl"] = "kl"
        '''teacher guidance'''
    args = parse_dataclass(Args)          # --lr 3e-5 --guidance sft; --help lists every field
    if args.lr <= 0:
        invalid("lr", args.lr, "positive")

Fields become `--kebab-case` flags typed like their defaults; booleans get `--x / --no-x`; a
`Literal` field accepts its values only. Each flag is declared once, in its dataclass (train.py's
Args; scripts/bench.py reuses it). A value outside its choices or range stops the program before
anything runs, with one line that names the flag, the value and what would be valid, and no
traceback.
"""

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import typing


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line instead of the usage block: what is wrong and what would be valid."""
        self.exit(2, f"{self.prog}: {message}\n")


def parse_dataclass(cls, argv=None, description=None, defaults=None):
    """Command-line flags from a dataclass's fields; each field's docstring is its --help text,
    a `Literal[...]` field's values its choices. `defaults` ({field: value}) replaces fields'
    defaults, e.g. per environment: a flag given explicitly still wins."""
    helps = {}
    # a subclass adds fields
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for i, node in enumerate(body[:-1]):
            if isinstance(node, ast.AnnAssign) and isinstance(body[i + 1], ast.Expr):
                helps[node.target.id] = body[i + 1].value.value
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=text)
        elif typing.get_origin(f.type) is typing.Literal:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=text,
                                choices=typing.get_args(f.type))
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=text)
    parser.set_defaults(**(defaults or {}))
    return cls(**vars(parser.parse_args(argv)))


def invalid(name, value, valid):
    """Stop with the one line that names the flag, its value and what is valid."""
    program = os.path.basename(sys.argv[0])
    sys.exit(
        f"{program}: argument --{name.replace('_', '-')}: {value!r} is not valid; "
        f"it must be {valid}"
    )
