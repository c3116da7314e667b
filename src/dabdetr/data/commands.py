"""`dabdetr check-data` and `dabdetr convert-data`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .check import check_dataset, format_report, plot_box_sizes, report_json
from .formats import FORMAT_CHOICES, FORMATS, open_dataset, write_dataset

logger = logging.getLogger(__name__)

__all__ = ["add_cli"]


def add_dataset_arguments(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    """--data, --format and the explicit COCO paths (shared with train/evaluate)."""
    p.add_argument("--data", required=data_required, default=None,
                   help="dataset folder (COCO, YOLO or Pascal VOC layout; for YOLO also its "
                        "data.yaml)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                   help="dataset format; auto detects it and says which")
    p.add_argument("--train-json", default=None, help="COCO: the train split's annotation file")
    p.add_argument("--val-json", default=None, help="COCO: the val split's annotation file")
    p.add_argument("--images", default=None,
                   help="COCO: the folder the json's file_name entries are relative to")


def _reader(args: argparse.Namespace):
    return open_dataset(args.data, args.format,
                        {"train": args.train_json, "val": args.val_json}, args.images)


def _cmd_check(args: argparse.Namespace) -> int:
    reader = _reader(args)
    checked = check_dataset(reader, args.split or None)
    reports = [r for _, r in checked]
    print(format_report(reader.format, reports, shown=args.show))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report_json(reader.format, reports), indent=1))
        print(f"report: {args.json}")
    if args.plot != "none":
        print(f"box sizes: {plot_box_sizes(reports, args.plot)}")
    return 1 if any(r.problems for r in reports) else 0


def _cmd_convert(args: argparse.Namespace) -> int:
    reader = open_dataset(args.src, args.format)
    checked = check_dataset(reader, args.split or None)
    bad = sum(len(r.problems) for _, r in checked)
    if bad and not args.skip_bad:
        print(format_report(reader.format, [r for _, r in checked]), file=sys.stderr)
        print(f"dabdetr convert-data: error: {bad} problem(s) in {args.src}; fix them or pass "
              "--skip-bad to leave the bad entries out", file=sys.stderr)
        return 2
    splits = {clean.split: clean for clean, _ in checked}
    if args.to == "yolo":
        crowd = sum(a["iscrowd"] for s in splits.values() for a in s.coco["annotations"])
        if crowd:
            logger.warning("%d crowd / difficult boxes have no YOLO form and are left out", crowd)
    written = write_dataset(splits, args.dst, args.to)
    counts = ", ".join(f"{s.split}: {len(s.coco['images'])} images" for s in splits.values())
    if bad:
        counts += f", {bad} bad entries left out"
    print(f"wrote {reader.format} -> {args.to} ({counts}) to {args.dst}: "
          + ", ".join(str(p) for p in written))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register `check-data` and `convert-data`."""
    p = sub.add_parser("check-data", help="count and check a dataset (COCO, YOLO or VOC)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_arguments(p, data_required=False)
    p.add_argument("--split", nargs="*", default=None,
                   help="splits to check; None: every split the dataset holds")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report here")
    p.add_argument("--plot", default="box_sizes.png", metavar="PNG",
                   help="box-size histogram ('none' to skip)")
    p.add_argument("--show", type=int, default=20, help="problems printed per split")
    p.set_defaults(func=_cmd_check)

    c = sub.add_parser("convert-data", help="write a dataset in another format",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("src", help="dataset folder (or YOLO data.yaml)")
    c.add_argument("dst", help="new output folder (must not exist or be empty)")
    c.add_argument("--to", choices=FORMATS, required=True, help="output format")
    c.add_argument("--format", choices=FORMAT_CHOICES, default="auto", help="input format")
    c.add_argument("--split", nargs="*", default=None,
                   help="splits to convert; None: every split the dataset holds")
    c.add_argument("--skip-bad", action="store_true",
                   help="leave out entries with problems instead of stopping")
    c.set_defaults(func=_cmd_convert)
