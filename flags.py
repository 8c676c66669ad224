"""Command-line flags from a dataclass, CleanRL-style: one field per flag, its docstring the help.

    @dataclass
    class Args:
        lr: float = 1e-5
        '''Adam learning rate'''
    args = parse_dataclass(Args)          # --lr 3e-5 on the command line; --help lists every field

Fields become `--kebab-case` flags typed like their defaults; booleans get `--x / --no-x`. Each
flag is declared once, in its dataclass (train.py's Args; bench.py and docs/compare.py reuse it).
"""

import argparse
import ast
import dataclasses
import inspect


def parse_dataclass(cls, argv=None, description=None, choices=None):
    """Command-line flags from a dataclass's fields; each field's docstring is its --help text.
    `choices` ({field: valid values}) makes argparse refuse anything else, naming the valid ones."""
    helps = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass adds fields
        body = ast.parse(inspect.getsource(klass)).body[0].body
        helps |= {node.target.id: body[i + 1].value.value for i, node in enumerate(body[:-1])
                  if isinstance(node, ast.AnnAssign) and isinstance(body[i + 1], ast.Expr)}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, text = "--" + f.name.replace("_", "-"), f"{helps[f.name]} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=f.type, default=f.default, help=text, choices=(choices or {}).get(f.name))
    return cls(**vars(parser.parse_args(argv)))
