"""Regenerate every benchmark result, table and plot the README quotes.

    python benchmarks/run_all.py [--quick]

--quick (fewer contexts, windows and budgets) finishes in about 10 minutes on
2 CPU cores; the full run takes hours there. Each script runs in its own
process, one after another, so they do not share the machine.
"""

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    flags = ["--quick"] if args.quick else []
    for script in ("sparse_attention.py", "quantized_decode.py", "speed.py", "fidelity.py"):
        print(f"== {script} {' '.join(flags)}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *flags], check=True)
    subprocess.run([sys.executable, str(HERE / "report.py")], check=True)


if __name__ == "__main__":
    main()
