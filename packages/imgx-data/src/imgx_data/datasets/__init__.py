"""TFDS builders of the imgx datasets (array_record, read with ``tfds.data_source``)."""

from imgx_data.datasets.amos_ct import AmosCt
from imgx_data.datasets.base import DatasetSpec, ImgxBuilder
from imgx_data.datasets.brats2021_mr import Brats2021Mr, Brats2021MrWt
from imgx_data.datasets.male_pelvic_mr import MalePelvicMr
from imgx_data.datasets.muscle_us import MuscleUs
from imgx_data.datasets.nifti_folder import NiftiFolder, nifti_folder_builder
from imgx_data.datasets.phantom import Phantom, Phantom3d

# Published and built-in datasets, by imgx name.
BUILDERS: dict[str, type[ImgxBuilder]] = {
    cls.name: cls
    for cls in (Phantom, Phantom3d, MuscleUs, MalePelvicMr, AmosCt, Brats2021Mr, Brats2021MrWt)
}
GENERATED = ("phantom", "phantom_3d")

__all__ = [
    "BUILDERS",
    "GENERATED",
    "AmosCt",
    "Brats2021Mr",
    "Brats2021MrWt",
    "DatasetSpec",
    "ImgxBuilder",
    "MalePelvicMr",
    "MuscleUs",
    "NiftiFolder",
    "Phantom",
    "Phantom3d",
    "nifti_folder_builder",
]
