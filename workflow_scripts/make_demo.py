"""Write the offline demo archive (raw layout zip + sha256 sidecar) for one registry entry."""

import argparse
from pathlib import Path

from vlretrieval.cli import json_arg, run
from vlretrieval.data.demo import DemoSpec, write_demo_archive


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True, help="dataset name, also the archive's top folder")
    parser.add_argument("--generator", type=json_arg, required=True, help="the registry entry's generator block (JSON)")
    parser.add_argument("--out", type=Path, required=True, help="zip to write; <out>.sha256 is written beside it")
    args = parser.parse_args(argv)
    digest = write_demo_archive(DemoSpec.from_config(args.name, args.generator), args.out)
    print(f"{args.out}: sha256 {digest}")


if __name__ == "__main__":
    raise SystemExit(run(main))
