"""python -m mlx_kvcache.offload prepare --model M: write the model's offload
layout now (otherwise it is written on first use)."""

import argparse

from mlx_kvcache.cli import run_command
from mlx_kvcache.offload import MODES, _progress_bar, layout_path, prepare
from mlx_kvcache.process import exit_now
from mlx_kvcache import loading


def run(args) -> None:
    source = loading.resolve(args.model)
    target = layout_path(source, args.offload)
    if target.exists():
        print(f"{target} (already prepared)")
        return
    print(f"{target}")
    prepare(args.model, progress=_progress_bar, mode=args.offload)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_kvcache.offload",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write the offload layout of a model")
    prepare_parser.add_argument("--model", default=None)
    prepare_parser.add_argument("--offload", default="layers", choices=MODES,
                                help="the layout of this mode (default layers)")
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    exit_now(main())
