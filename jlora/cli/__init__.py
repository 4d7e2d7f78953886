"""The ``jlora`` command line: ``jlora finetune | plan | export | merge | generate | embed |
info``.

Every subcommand is one typed dataclass (:mod:`jlora.cli.args`), parsed by tyro, optionally
read from a YAML/JSON ``--config`` file and overridden by flags. A user mistake (a
:class:`~jlora.errors.JloraError`) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jlora.errors import JloraError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``jlora`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    from jlora.cli import args as A
    from jlora.cli.parse import parse
    from jlora.train import reuse_host_memory

    reuse_host_memory()  # before any JAX computation: XLA:CPU steps reuse their temporaries
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = parse(argv)
        if isinstance(cfg, A.Finetune):
            from jlora.cli.finetune import run

            return run(cfg)
        from jlora.cli import commands

        runners = {A.Plan: commands.plan, A.Export: commands.export, A.Merge: commands.merge_cmd,
                   A.Generate: commands.generate_cmd, A.Embed: commands.embed_cmd,
                   A.Info: commands.info}
        return runners[type(cfg)](cfg)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except JloraError as e:
        message = " ".join(str(e).split())
        print(f"jlora: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jlora: interrupted", file=sys.stderr)
        return 130


__all__ = ["main"]
