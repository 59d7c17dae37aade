"""Make the shipped SST-2 files from the GLUE SST-2 TSVs (see scaletrain/data/assets/README.md).

    python tools/make_sst2_subset.py /path/to/sst2 scaletrain/data/assets --per_label 1000

Writes `sst2-train-2000.tsv` (a class-balanced random subset of train.tsv: `per_label` rows of
each label, chosen with random.Random(seed), kept in their original order) and
`sst2-validation.tsv` (validation.tsv unchanged: the 872-sentence GLUE dev set).
"""
from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="directory with train.tsv and validation.tsv")
    p.add_argument("out", type=Path)
    p.add_argument("--per_label", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    lines = (args.src / "train.tsv").read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    rng = random.Random(args.seed)
    keep: set[int] = set()
    for label in ("0", "1"):
        idx = [i for i, r in enumerate(rows) if r.rsplit("\t", 1)[1] == label]
        keep.update(rng.sample(idx, args.per_label))
    out = args.out / f"sst2-train-{2 * args.per_label}.tsv"
    out.write_text("\n".join([header] + [rows[i] for i in sorted(keep)]) + "\n", encoding="utf-8")
    shutil.copyfile(args.src / "validation.tsv", args.out / "sst2-validation.tsv")
    print(f"wrote {out} ({len(keep)} rows) and {args.out / 'sst2-validation.tsv'}")


if __name__ == "__main__":
    main()
