"""The ``vkick`` command: a thin front door over the library (run, check, analyze, trace, plot).

Each subcommand module exposes ``add_parser(subparsers)`` and ``main(args) -> int``.  Errors a
user can fix (``VkickError``) print one line on stderr and exit 2 (bad input) or 1 (a failed
check or violation); anything else is an internal error, whose traceback is saved to a file
rather than splashed on the terminal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
import traceback
from collections.abc import Sequence

_COMMANDS = ("run", "check", "analyze", "trace", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vkick",
        description="Emulate the Linux v5.13 KVM interrupt-injection path "
        "(vhost → eventfd → irqfd → LAPIC → posted interrupts → vCPU).")
    from vkick import __version__  # noqa: PLC0415

    parser.add_argument("--version", action="version", version=f"vkick {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        if importlib.util.find_spec(f"vkick.cli.{name}") is None:
            continue  # a command whose module is not part of this build
        module = importlib.import_module(f"vkick.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vkick`` console script."""
    from vkick.errors import ConfigError, VkickError  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(f"vkick.cli.{args.command}")
    try:
        return int(module.main(args))
    except ConfigError as exc:
        print(f"vkick: {exc}", file=sys.stderr)
        return 2
    except VkickError as exc:
        print(f"vkick: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("vkick: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (vkick … | head): stop quietly, as cat does.
        import os  # noqa: PLC0415

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        with tempfile.NamedTemporaryFile(
                "w", prefix="vkick-crash-", suffix=".txt", delete=False) as fh:
            traceback.print_exc(file=fh)
        print(f"vkick: internal error (this is a bug in vkick; please report it with the "
              f"seed and config); traceback saved to {fh.name}", file=sys.stderr)
        return 3


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
