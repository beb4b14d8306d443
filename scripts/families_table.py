"""Run the family matrix of tests/test_families.py and print (or write into docs/models.md) its markdown table.

    python scripts/families_table.py                     # print the tables
    python scripts/families_table.py --write docs/models.md   # replace the part between the markers there

Each cell is the outcome of the same check function the tests run on the same tiny model; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
BEGIN, END = "<!-- families table: begin (scripts/families_table.py) -->", "<!-- families table: end -->"


def outcome(check, name) -> str:
    try:
        if check.__name__ == "check_export_reload":
            with tempfile.TemporaryDirectory() as tmp:
                check(name, __import__("pathlib").Path(tmp))
        else:
            check(name)
    except Exception as e:  # a failing cell is reported, not hidden
        return f"FAIL ({type(e).__name__})"
    except BaseException as e:  # pytest.skip: the check does not apply to this family
        if type(e).__name__ != "Skipped":
            raise
        return f"n/a: {e.msg}"
    return "yes"


def render() -> str:
    import transformers

    from families import FAMILIES, REFUSED, family_model, refused_config
    from ptuning.errors import UserError
    from ptuning.model import attach_prefix, check_architecture
    from test_families import CHECKS, PEFT_UNSUPPORTED

    transformers.utils.logging.set_verbosity_error()
    columns = list(CHECKS)
    lines = ["| family | model class | prefix per layer and token | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for name in sorted(FAMILIES):
        config = attach_prefix(family_model(name), 1).prefix_config
        if config.same_widths:
            shape = f"{config.num_kv_heads} heads x {config.head_dim} (K and V)"
        else:
            shape = f"{config.num_kv_heads} head: K {config.head_dim}, V {config.value_head_dim}"
        cells = []
        for column, check in CHECKS.items():
            result = outcome(check, name)
            if column == "PEFT parity" and name in PEFT_UNSUPPORTED and result == "yes":
                result = f"n/a: PEFT cannot ({PEFT_UNSUPPORTED[name]})"
            cells.append(result)
        lines.append(f"| {name} ({FAMILIES[name][3]}) | `{FAMILIES[name][1]}` | {shape} | " + " | ".join(cells) + " |")
    lines += ["", "Refused (one tiny config per kind; the message is what `main.py` prints after `error:`):", "",
              "| kind | message |", "|---|---|"]
    for kind in sorted(REFUSED):
        try:
            check_architecture(refused_config(kind))
            message = "NOT REFUSED"
        except UserError as e:
            message = str(e)
        lines.append(f"| {kind} | {message} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    table = render()
    if not args.write:
        print(table, end="")
        return 0
    text = open(args.write, encoding="utf-8").read()
    if BEGIN not in text or END not in text:
        print(f"error: {args.write}: no table markers ({BEGIN} ... {END})", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.write, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{table}{END}{tail}")
    print(f"wrote the table of {table.count(chr(10))} lines into {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
