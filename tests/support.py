"""Helpers shared by tests (importable as ``support`` because tests/ is on sys.path under pytest)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from radssl.data.store import ImageStore, TaskInfo


def make_tiny_store(n: int = 96, size: int = 16, seed: int = 0) -> ImageStore:
    """A small binary store with a learnable signal (bright square for class 1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 120, (n, 1, size, size), generator=generator, dtype=torch.uint8)
    images[labels == 1, :, size // 4 : size // 2, size // 4 : size // 2] = 230
    split = np.array(["train"] * (n * 3 // 4) + ["val"] * (n // 8) + ["test"] * (n - n * 3 // 4 - n // 8))
    return ImageStore(
        name="tiny",
        images=images,
        labels=labels.long(),
        split=split,
        patient_id=np.array([f"p{i // 2}" for i in range(n)]),
        task=TaskInfo("binary", 2, ("negative", "positive")),
    )


def chest_xrays(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels (n,)): a class-balanced draw of real PneumoniaMNIST training images.

    ``path``: the file, from the ``medmnist_file`` fixture (which skips, saying so, when it is absent). No
    synthetic stand-in: a test that promises real chest X-rays either gets them or is reported as skipped.
    """
    with np.load(path) as archive:
        images, labels = archive["train_images"], archive["train_labels"][:, 0]
    rng = np.random.default_rng(seed)
    # balanced draw so every split has both classes
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 2, replace=False) for c in (0, 1)])
    return images[rows], labels[rows].astype(np.int64)


def write_png_csv_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_patient: int = 2) -> Path:
    """PNG files + labels.csv (path, label, patient_id): the layout hospital exports often have."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,patient_id"]
    names = ("normal", "pneumonia")
    for index, (image, label) in enumerate(zip(images, labels)):
        name = f"img_{index:04d}.png"
        Image.fromarray(image).save(root / name)
        lines.append(f"{name},{names[int(label)]},patient_{index // per_patient:04d}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def write_dicom_folder(root: Path, images: np.ndarray, labels: np.ndarray, per_patient: int = 2) -> Path:
    """One DX DICOM file per image (12-bit in 16-bit words, MONOCHROME2) + a label CSV keyed by PatientID."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root.mkdir(parents=True, exist_ok=True)
    patients: dict[str, int] = {}
    for index, (image, label) in enumerate(zip(images, labels)):
        patient = f"P{index // per_patient:04d}"
        patients[patient] = int(label)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.Modality = patient, "DX"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelSpacing = [0.5, 0.5]
        ds.PixelData = (image.astype(np.uint16) * 16).tobytes()  # 8-bit → 12-bit range
        ds.save_as(root / f"{index:04d}.dcm", enforce_file_format=True)
    label_csv = root.parent / f"{root.name}_labels.csv"
    label_csv.write_text("patient_id,label\n" + "".join(f"{p},{l}\n" for p, l in patients.items()))
    return label_csv


SHORT_RUN_OPTIM: dict[str, dict[str, object]] = {
    # SimCLR's shipped preset is a batch-256, constant-SGD (lr 0.06, no momentum) recipe chosen for ≥ 87 steps on
    # validation data (benchmarks/preset_sweep.py). At batch 32 × 20 steps its loss moves less than its
    # step-to-step noise (measured 4.45 → 4.56 on the synthetic radiographs), so the
    # 20-step smoke tests give it the demo's AdamW optimiser instead; its views stay the preset's.
    "simclr": {"optimizer": "adamw", "lr": 0.002, "lr_scaling": "none", "weight_decay": 1e-4},
}
"""Optimiser overrides that make a method's loss move measurably in a 20-step test (others use their presets)."""

SHORT_RUN_METHOD: dict[str, dict[str, object]] = {
    # MoCo v2's queue starts from random unit keys (MoCo's reference); for queue_size / batch steps real keys —
    # harder negatives than random vectors — replace them and the loss rises (4.06 → 5.99 over 20 steps with the
    # default 4096 keys at batch 32 on one fixed batch). A queue of one batch ends that transient after step 0.
    "moco_v2": {"queue_size": 32},
}
"""Method overrides for the 20-step smoke tests (batch 32); others use their defaults."""

SHORT_RUN_TRANSIENT_STEPS: dict[str, int] = {"moco_v2": 1}
"""Leading steps left out of the falling-loss check: MoCo v2's step 0 contrasts with the random start only."""


def bakeoff_run(method: str, seed: int, ssl: list[float], random: list[float]) -> dict:
    """One committed-format bake-off run (``benchmarks/bakeoff_lib.run_child``'s record) with the given linear/kNN
    test AUCs at 1 / 10 / 100 % labels, for tests of the scripts that summarise and render such runs."""
    fractions = ("0.01", "0.1", "1")

    def readout(values: list[float]) -> dict:
        return {protocol: {f: {"test_auc": v} for f, v in zip(fractions, values)} for protocol in ("linear", "knn")}

    return {"method": method, "seed": seed, "backbone": "resnet18", "images_seen": 1000, "pretrain_wall_s": 60.0,
            "pretrain_images_per_s": 16.0, "peak_rss_mb": 900.0, "final_loss": 1.0,
            "ssl": readout(ssl), "random_init": readout(random)}


def load_benchmark_script(name: str):  # noqa: ANN201 - a module
    """``benchmarks/<name>.py`` as a module; its directory stays on sys.path while loading (it imports bakeoff_lib)."""
    import importlib.util
    import sys

    directory = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(directory))
    try:
        spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(directory))


@contextmanager
def on_one_fixed_batch(config):  # noqa: ANN001, ANN201 - PretrainConfig in, PretrainConfig yielded
    """The same config, its view policy made to return the same views of the same rows at every step.

    Why: on fresh images every step, a contrastive loss at batch 32 moves more from step to step than it falls in 20
    steps (SimCLR's step-to-step SD .40 against a .14 fall in 2D; ±1 on volumes), so a 20-step trend is a coin flip
    that a CPU's summation order decides — SimCLR and MoCo v3 rose on one machine's volumes and fell on another's.
    On one fixed batch a method whose gradients reach its loss must lower it: that is what the smoke tests check.
    The policy is the method's own (views, sizes, masks, targets), registered under a new name, not patched, and
    removed from the registry on leaving the ``with`` block (tests use it through the ``one_fixed_batch``
    fixture), so no test leaves a policy behind for the next one.
    """
    from radssl.views.policies import POLICIES, policy_class, register_policy

    base = policy_class(config.views.policy)

    class OneFixedBatch(base):  # type: ignore[misc, valid-type]
        name = f"one_fixed_batch_{base.name}"

        def __call__(self, rows, images, columns, generator):  # noqa: ANN001, ANN204
            return super().__call__(torch.arange(len(rows)), images, columns, torch.Generator().manual_seed(0))

    previous = POLICIES.get(OneFixedBatch.name)
    register_policy(OneFixedBatch)
    try:
        yield config.model_copy(update={"views": config.views.model_copy(update={"policy": OneFixedBatch.name})})
    finally:
        if previous is None:
            POLICIES.pop(OneFixedBatch.name, None)
        else:
            POLICIES[OneFixedBatch.name] = previous
