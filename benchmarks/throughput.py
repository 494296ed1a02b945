"""Training-step throughput / FLOPs / MFU / memory of every method, side by side (same as `mimkit bench`).

    python benchmarks/throughput.py --help
"""

from mimkit.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
