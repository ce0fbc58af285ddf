"""The ``radssl`` command: ``demo``, ``pretrain``, ``study``, ``report``, ``data inspect``.

Every subcommand takes ``--help``. Config values come from YAML and can be overridden on the command line as
``section.key=value`` (validated exactly like the file), e.g. ``radssl pretrain --config p.yaml train.steps=100``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from radssl.config import load_config, read_yaml_mapping
from radssl.data.build import build_store
from radssl.data.medical import inspect_store
from radssl.engine.pretrain import pretrain
from radssl.errors import RadsslError
from radssl.evaluation.quick import evaluate_pretraining, summary_lines
from radssl.models.foundation_weights import fingerprint
from radssl.study.bakeoff import load_bakeoff_config, plan_bakeoff, plan_lines
from radssl.study.bakeoff_replicates import run_bakeoff
from radssl.study.commands import add_study_commands, run_demo_study
from radssl.study.config import load_study_config
from radssl.study.preflight import config_kind as kind_of
from radssl.study.preflight import preflight
from radssl.transfer.embed import embedding_table, write_embeddings
from radssl.transfer.export import EXPORT_TARGETS, export_checkpoint
from radssl.transfer.initialisation import INIT_KINDS, initialise_backbone

OVERRIDES_HELP = "config overrides as section.key=value (YAML values), e.g. train.steps=200 method.temperature=0.2"


def _common_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    if getattr(args, "data_root", None):
        overrides.append(f"data.root={args.data_root}")
    return overrides


def _print_evaluation(evaluation: dict | None) -> None:
    if evaluation:
        print("frozen-backbone evaluation (SSL vs random init, same architecture):")
        for line in summary_lines(evaluation):
            print("  " + line)


def cmd_pretrain(args: argparse.Namespace) -> int:
    config = load_config(args.config, _common_overrides(args))
    store = build_store(config.data)
    result = pretrain(config, store=store)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 evaluates and reports
        return 0
    print(f"pretraining finished: {result.steps} steps, {result.wall_time_s:.0f} s, final loss {result.final_loss:.4f}")
    _print_evaluation(evaluate_pretraining(result, store, config))
    print(f"checkpoint: {result.checkpoint}")
    print(f"outputs:    {result.output_dir} (config.yaml, run.json, metrics.csv, tensorboard/, eval.json)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    task = getattr(args, "task", "classification")
    print("radssl demo: a small study on the embedded *synthetic* radiograph-like dataset (offline):")
    if task == "segmentation":
        print("  SimCLR pretraining, then random vs SSL encoders fine-tuned with a U-Net decoder")
        print("  segmenting the synthetic finding at 3 label fractions (Dice per case),")
    else:
        print("  SimCLR pretraining, then random vs SSL initialisation at 3 label fractions,")
    print("  internal test split + a shifted-site external test set, ending with an HTML report.")
    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    output = run_demo_study(Path(args.output_dir) if args.output_dir else None, overrides, task=task)
    print(f"outputs are in {Path(output).resolve()} (report: {Path(output).resolve() / 'report' / 'report.html'})")
    return 0


def config_kind(raw: dict) -> str:
    """``study``, ``pretrain`` or ``data`` (see :func:`radssl.study.preflight.config_kind`)."""
    return kind_of(raw)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Run the checks the config's own command runs before compute (one validation path), then inspect its data."""
    kind, datasets = preflight(args.config, list(args.overrides), log=print)
    print(f"{args.config}: valid {kind} config" + (f" (every check `radssl {kind}` runs before compute passed)"
                                                  if kind != "data" else ""))
    out = Path(args.out) if args.out else Path(args.config).with_suffix(".montage.png")
    for index, (where, store) in enumerate(datasets):
        montage = out if index == 0 else out.with_name(f"{out.stem}.{where.rsplit('.', 1)[-1]}{out.suffix}")
        if len(datasets) > 1:
            print(f"\n[{where}]")
        print(inspect_store(store, montage))
    return 0


def cmd_bakeoff(args: argparse.Namespace) -> int:
    """Every method that fits the data (or --methods) at one budget, each with its random-init twin, as studies."""
    # `--methods a b key=value`: argparse hands the override to --methods; give it back to the overrides.
    methods = [m for m in args.methods or [] if not _is_override(m)] or None
    extra = [m for m in args.methods or [] if _is_override(m)]
    config = load_bakeoff_config(args.config, _common_overrides(args) + extra, methods=methods)
    if args.plan_only:
        print("\n".join(plan_lines(plan_bakeoff(config))))
        return 0
    summary = run_bakeoff(config)
    print(f"bake-off summary: {summary}")
    for report in json.loads(summary.read_text())["reports"].values():
        print(f"report:           {report}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.to, args.out)
    print(f"exported {args.checkpoint} → {out} ({args.to}; spec in {out / 'radssl_export.json'})")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """One embedding per image of a config's data (pretrain or study config), from a checkpoint or foundation init."""
    if Path(args.out).suffix not in (".parquet", ".npz", ".csv"):
        raise RadsslError(f"{args.out}: --out must end in .parquet, .npz or .csv")
    kind = config_kind(read_yaml_mapping(args.config))
    config = (load_study_config if kind == "study" else load_config)(args.config, list(args.overrides))
    store = build_store(config.data)
    text = str(args.checkpoint)
    if text.partition(":")[0] not in INIT_KINDS:
        text = f"ssl:{text}"
    backbone = initialise_backbone(text, in_channels=store.channels, image_size=store.image_shape)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    provenance = {"init": text, "backbone_spec": backbone.spec.to_dict(), "data": store.describe(),
                  "data_fingerprint": store.fingerprint(),
                  "weights": getattr(backbone, "provenance", None)
                  or ({"sha256": fingerprint([Path(text[4:])])} if text.startswith("ssl:") else None)}
    table = embedding_table(store, backbone, batch_size=args.batch_size, device=device)
    out = write_embeddings(table, args.out, provenance)
    print(f"{len(table['row'])} embeddings of dimension {table['embedding'].shape[1]} → {out}")
    return 0


def _add_transfer_commands(sub: argparse._SubParsersAction) -> None:
    """``export`` and ``embed``: weights and embeddings out (radssl.transfer.export / .embed)."""
    export = sub.add_parser("export", help="write a checkpoint's backbone in another library's format",
                            description="Write the backbone of a pretraining checkpoint as a folder that loads in "
                                        "the target library without radssl (with radssl_export.json + README.md).")
    export.add_argument("checkpoint", type=Path, help="a radssl pretraining checkpoint (checkpoints/final.pt)")
    export.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="target library or format")
    export.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    export.set_defaults(func=cmd_export)

    embed = sub.add_parser("embed", help="one embedding per image of a config's data (parquet, npz or csv)")
    embed.add_argument("config", type=Path, help="a pretraining or study YAML (its data section is embedded)")
    embed.add_argument("--checkpoint", required=True,
                       help="a radssl checkpoint .pt, or an initialisation (hf:<folder>, timm:…, …)")
    embed.add_argument("--out", required=True, type=Path, help="FILE.parquet, FILE.npz or FILE.csv")
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, mps")
    embed.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    embed.set_defaults(func=cmd_embed)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", help="where checkpoints, metrics and results go (config: output_dir)")
    parser.add_argument("--seed", type=int, help="run seed (config: seed)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radssl",
        description="Self-supervised pretraining and label-efficiency studies for radiological images.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on the embedded synthetic dataset (offline)")
    demo.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                      help="classification (AUC; default) or segmentation (Dice on the findings' masks)")
    _add_run_options(demo)
    demo.set_defaults(func=cmd_demo)

    pre = sub.add_parser("pretrain", help="self-supervised pretraining from a YAML config")
    pre.add_argument("--config", type=Path, help="pretraining YAML (defaults when omitted)")
    pre.add_argument("--data-root", help="folder with dataset files (config: data.root; env RADSSL_DATA_DIR)")
    _add_run_options(pre)
    pre.set_defaults(func=cmd_pretrain)

    data = sub.add_parser("data", help="inspect a dataset declared in a config")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser(
        "inspect",
        help="run the checks the config's command runs before compute, then print counts, mask stats, a montage",
        description=(
            "Validate a whole pretraining or study config (told apart by its keys) and run every check "
            "`radssl pretrain` / `radssl study` runs before compute (protocols against the data, prompts against "
            "the classes, views against the method, batch against the data), then print counts per split, class, "
            "patient and modality, mask statistics, the notes on how the data were read and split, and write a "
            "montage PNG."
        ),
    )
    inspect.add_argument("config", type=Path, help="a pretraining or study YAML")
    inspect.add_argument("--out", help="montage PNG path (default: <config>.montage.png)")
    inspect.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    inspect.set_defaults(func=cmd_data_inspect)

    add_study_commands(sub)

    bakeoff = sub.add_parser(
        "bakeoff",
        help="which pretext task for my data? every method that fits the data at one budget, vs random init",
        description=(
            "Run every registered SSL method that fits the data (or --methods) at ONE stated budget — "
            "budget: {images_seen: N} (equal images seen) or {wall_clock_s: T, threads: k} (equal measured "
            "wall-clock, calibrated per method) — each read out beside its random-init twin at the config's label "
            "fractions and seeds. Runs as studies (resumable, same report and statistics) and writes "
            "<output_dir>/bakeoff.json."
        ),
    )
    bakeoff.add_argument("config", type=Path, help="bake-off YAML (see configs/bakeoff_example.yaml)")
    bakeoff.add_argument("--methods", nargs="+", metavar="METHOD", help="only these methods (config: methods)")
    bakeoff.add_argument("--output-dir", help="where the studies and bakeoff.json go (config: output_dir)")
    bakeoff.add_argument("--plan-only", action="store_true",
                         help="select the methods and set the budget's steps (calibrating a wall-clock budget, kept "
                              "for the real run), print the plan and stop before any pretraining")
    bakeoff.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    bakeoff.set_defaults(func=cmd_bakeoff)
    _add_transfer_commands(sub)
    return parser


def _is_override(text: str) -> bool:
    return "=" in text and not text.startswith("-")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key=value`` overrides anywhere, also after options such as ``--output-dir``.

    argparse fills a ``nargs="*"`` positional from one run of positionals only, so overrides placed after an
    option would be "unrecognized arguments"; here they are appended (in order) to ``args.overrides``.
    Anything else unknown is still an error.
    """
    args, extras = parser.parse_known_args(argv)
    stray = [e for e in extras if not _is_override(e)] if hasattr(args, "overrides") else extras
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = list(args.overrides or []) + extras
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        return int(args.func(args))
    except RadsslError as error:
        print(f"radssl: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("radssl: interrupted — rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
