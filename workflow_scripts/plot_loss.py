"""Plot the fine-tuning loss and learning rate per step."""

import argparse
from pathlib import Path

from vlretrieval.cli import run
from vlretrieval.tracking.plots import plot_loss_curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-log", type=Path, required=True)
    parser.add_argument("--title", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    plot_loss_curve(args.train_log, args.out, title=args.title)


if __name__ == "__main__":
    raise SystemExit(run(main))
