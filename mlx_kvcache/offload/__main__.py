"""python -m mlx_kvcache.offload prepare --model M: write the model's offload
layout now (otherwise it is written on first use)."""

import argparse

from mlx_kvcache.cli import run_command
from mlx_kvcache.offload import _progress_bar, layout_path, prepare
from mlx_kvcache.process import exit_now
from mlx_kvcache import loading


def run(args) -> None:
    source = loading.resolve(args.model)
    target = layout_path(source)
    if target.exists():
        print(f"{target} (already prepared)")
        return
    print(f"{target}")
    prepare(args.model, progress=_progress_bar)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_kvcache.offload",
                                     description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write the offload layout of a model")
    prepare_parser.add_argument("--model", default=None)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    exit_now(main())
