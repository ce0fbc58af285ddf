"""Build an ImageStore from a validated ``data`` config section (the only place that knows every source)."""

from __future__ import annotations

from radssl.config import FilesData, MedMNISTData, SyntheticData, SyntheticVolumeData
from radssl.data.medical import load_medical_store
from radssl.data.medmnist import load_medmnist
from radssl.data.slices import volumes_to_slices
from radssl.data.store import ImageStore
from radssl.data.synthetic import SyntheticSpec, make_synthetic_store
from radssl.data.synthetic3d import make_synthetic_volume_store


def build_store(section: MedMNISTData | SyntheticData | FilesData) -> ImageStore:
    """Load or generate the dataset a config names (volumes as 2D slices under ``slices``), validated."""
    store = _load(section)
    slices = getattr(section, "slices", None)
    if slices is not None:
        store = volumes_to_slices(store, slices.axis, slices.keep)
    return store


def _load(section: MedMNISTData | SyntheticData | FilesData) -> ImageStore:
    if isinstance(section, MedMNISTData):
        return load_medmnist(section.name, section.size, section.root, allow_download=section.download)
    if isinstance(section, SyntheticData):
        extra = {} if section.finding_contrast is None else {"finding_contrast": section.finding_contrast}
        spec = SyntheticSpec(
            **extra,
            n_patients=section.n_patients,
            images_per_patient=section.images_per_patient,
            image_size=section.image_size,
            positive_rate=section.positive_rate,
            site=section.site,
            seed=section.data_seed,
            reports=section.reports,
            masks=section.masks,
        )
        return make_synthetic_store(spec)
    if isinstance(section, SyntheticVolumeData):
        return make_synthetic_volume_store(section.spec())
    if isinstance(section, FilesData):
        return load_medical_store(section, name=section.name)
    raise TypeError(f"unsupported data section {type(section).__name__}")
