"""``python -m labkit.bench NAME [options]``: run one recorded benchmark on the GPU.

Each benchmark is a module ``labkit/bench/NAME.py`` with ``add_arguments(parser)`` (optional) and
``run(args) -> dict``; the dict (shapes, rows of ``impl``/``median_ms``/...) is saved with provenance.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import labkit  # noqa: F401  (CPU/GPU mode first)
from labkit.bench import record


def _names() -> list[str]:
    import labkit.bench as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name not in {"record", "__main__"})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in _names():
        raise SystemExit(f"usage: python -m labkit.bench NAME [options]; NAME is one of {_names()}")
    name = argv[0]
    module = importlib.import_module(f"labkit.bench.{name}")
    parser = argparse.ArgumentParser(prog=f"python -m labkit.bench {name}")
    parser.add_argument("--out", default=None, help="write here instead of data/bench/NAME.json")
    if hasattr(module, "add_arguments"):
        module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    result = module.run(args)
    command = "python -m labkit.bench " + " ".join(argv)
    if args.out:
        import json, pathlib

        pathlib.Path(args.out).write_text(json.dumps({"name": name, "provenance": record.provenance(command), **result}, indent=1))
        print(f"wrote {args.out}")
    else:
        print(f"wrote {record.save(name, result, command)}")


if __name__ == "__main__":
    main()
