"""Write a config-only checkpoint folder of a real model's shape (config.json + the project's small
tokenizer, no weights) for `--load-format dummy` benchmarks.

    python benchmarks/make_shape_folder.py llama-3.1-8b OUT_DIR

The shapes and the folder layout are bench_decode.py's (SHAPES, shape_folder); this only puts the
folder at a path of the caller's choosing. An existing OUT_DIR with the same config.json is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode import SHAPES, shape_folder  # noqa: E402


def make_shape_folder(shape: str, out_dir: str) -> str:
    config = os.path.join(out_dir, "config.json")
    if os.path.isfile(config):
        with open(config) as f:
            if json.load(f) == SHAPES[shape]:
                return out_dir
        raise FileExistsError(f"{out_dir} holds another config.json; remove it or pick another folder")
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)      # else the move would put the folder inside it
    tmp = shape_folder(shape)
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    shutil.move(tmp, out_dir)
    return out_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out_dir")
    args = p.parse_args()
    print(make_shape_folder(args.shape, args.out_dir))


if __name__ == "__main__":
    main()
