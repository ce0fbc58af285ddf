"""The ``radssl study`` and ``radssl report`` subcommands, and the embedded demo study.

``add_study_commands(subparsers)`` is called by :mod:`radssl.cli`; each handler returns an exit code and raises
:class:`~radssl.errors.RadsslError` for user errors (the CLI prints those without a traceback).
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from radssl.errors import DataError
from radssl.study.report import render_report
from radssl.study.results_store import ResultsStore
from radssl.study.runner import REPORT_DIR, RESULTS_FILE, run_study

DEMO_PRESET = "demo_study"
DEMO_PRESETS = {"classification": "demo_study", "segmentation": "demo_segmentation"}
"""``radssl demo --task``: the embedded demo study of each task (``radssl/presets/<name>.yaml``)."""
OVERRIDES_HELP = (
    "study overrides as key.path=value (YAML values), e.g. seeds=[0,1] protocols.finetune.epochs=10; entries of "
    "the pretraining and external_test_sets lists by name: pretraining.simclr.train.steps=200"
)


def demo_study_preset(task: str = "classification") -> Path:
    """Path of the embedded demo study YAML of a task (``radssl/presets/demo_study.yaml``, ``demo_segmentation``)."""
    if task not in DEMO_PRESETS:
        raise DataError("radssl demo --task", f"unknown task '{task}'", f"choose one of {', '.join(DEMO_PRESETS)}")
    return Path(str(resources.files("radssl.presets") / f"{DEMO_PRESETS[task]}.yaml"))


def run_demo_study(output_dir: Path | None = None, overrides: list[str] | None = None,
                   task: str = "classification") -> Path:
    """Run an embedded demo study on synthetic data (random vs SSL, internal + shifted-site test sets).

    ``task``: ``classification`` (AUC; linear probe, kNN, fine-tuning) or ``segmentation`` (Dice; frozen-encoder and
    fine-tuned U-Net decoders on the synthetic findings' masks). Returns the study output folder; the report is
    ``<folder>/report/report.html``.
    """
    extra = list(overrides or [])
    if output_dir is not None:
        extra.append(f"output_dir={output_dir}")
    return run_study(demo_study_preset(task), extra)


def _study_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return overrides


def cmd_study(args: argparse.Namespace) -> int:
    output_dir = run_study(args.config, _study_overrides(args), executor=args.executor, address=args.address,
                           max_retries=args.max_retries)
    print(f"results: {output_dir / 'results.sqlite'}")
    print(f"report:  {output_dir / REPORT_DIR / 'report.html'}")
    return 0


def resolve_results(path: Path) -> Path:
    """A study output folder or a ``results.sqlite`` file → the results file (a clear error if absent)."""
    path = Path(path)
    candidate = path / RESULTS_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise DataError(str(candidate), "no study results found",
                        "pass a study output folder (holding results.sqlite) or the results.sqlite file itself")
    return candidate


def make_report(results: Path, out_dir: Path | None = None, study: str | None = None,
                metric: str | None = None) -> Path:
    """Render the HTML report of one study in a results store; returns the HTML path."""
    results = resolve_results(results)
    with ResultsStore(results) as store:
        studies = store.studies()
        if study is None:
            if len(studies) != 1:
                raise DataError(str(results), f"holds {len(studies)} studies {studies}",
                                "choose one with --study NAME" if studies else "run a study first")
            study = studies[0]
        elif study not in studies:
            raise DataError(str(results), f"holds no study named '{study}'", f"choose one of {studies}")
        return render_report(store, study, out_dir or results.parent / REPORT_DIR, primary_metric=metric)


def cmd_report(args: argparse.Namespace) -> int:
    path = make_report(args.results, args.out, args.study, args.metric)
    print(f"report: {path}")
    return 0


def add_study_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``study`` and ``report`` to the ``radssl`` command's subparsers."""
    study = subparsers.add_parser(
        "study",
        help="run (or resume) a label-efficiency study grid from a YAML file",
        description=(
            "Run every cell of a study grid — pretraining run × initialisation × label fraction × seed × "
            "protocol × test set — and render an HTML report. Finished cells are stored in "
            "<output_dir>/results.sqlite at once, so rerunning the same command resumes a killed study without "
            "recomputing anything."
        ),
    )
    study.add_argument("config", type=Path, help="study YAML (see configs/pneumoniamnist.yaml)")
    study.add_argument("--output-dir", help="where results, checkpoints and the report go (config: output_dir)")
    study.add_argument("--executor", choices=("serial", "ray"), default="serial",
                       help="serial: every task in this process (default); ray: Ray tasks on this machine's CPUs/GPUs "
                            "or a cluster's (pip install radssl[ray]; per-task CPUs/GPUs from the config's resources)")
    study.add_argument("--address", default=None,
                       help="ray only: join a running cluster (auto, or ray://HOST:10001); default: start a Ray "
                            "instance on this machine, listening on 127.0.0.1 only. The output folder must be on a "
                            "filesystem every node sees")
    study.add_argument("--max-retries", type=int, default=1,
                       help="ray only: reruns of a task whose worker died (default 1)")
    study.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    study.set_defaults(func=cmd_study)

    report = subparsers.add_parser(
        "report",
        help="render the HTML report of a study from its results",
        description="Render report.html (self-contained) and results.csv from a study's results store.",
    )
    report.add_argument("results", type=Path, help="study output folder or its results.sqlite")
    report.add_argument("--out", type=Path, help="output folder (default: <study folder>/report)")
    report.add_argument("--study", help="study name, when the results file holds several")
    report.add_argument("--metric", default=None,
                        help="metric of curves and tests (default: each protocol's own — AUC for classification, "
                             "Dice for segmentation); e.g. accuracy")
    report.set_defaults(func=cmd_report)
