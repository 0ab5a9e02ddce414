"""Training data at model input size: prepared TFRecord datasets, labelled folders, phantom slices.

* :mod:`~worker.research.datasets.prepared`: ``ichvol dataset`` writes and training reads
  sharded TFRecord datasets (the format and the windowing are documented there);
* :mod:`~worker.research.datasets.labelled`: 2-D image/mask folders and CT study folders
  with truth, their pseudonymous patients and the split by patient;
* :mod:`~worker.research.datasets.phantom_slices`: slices of in-memory phantoms with a
  random geometry and lesion mix.

The public names of all three are importable from here.
"""

from worker.research.datasets.labelled import (
    DEFAULT_PATIENT_PATTERN,
    MIN_IMAGE_SIDE,
    PATIENT_SALT,
    UINT8_WINDOW,
    ImagePair,
    assign_splits,
    find_image_pairs,
    find_studies,
    load_image_pair,
    load_study_slices,
    pseudonym,
    study_patient,
)
from worker.research.datasets.phantom_slices import (
    LESION_MIXES,
    phantom_slices,
    random_spec,
)
from worker.research.datasets.prepared import (
    DATASET_FORMAT,
    DEFAULT_SHARD_SIZE,
    MANIFEST_NAME,
    SPLITS,
    DatasetSplit,
    PreparedDataset,
    parse_example,
    prepare_dataset,
    read_dataset,
)

__all__ = [
    "DATASET_FORMAT",
    "DEFAULT_PATIENT_PATTERN",
    "DEFAULT_SHARD_SIZE",
    "LESION_MIXES",
    "MANIFEST_NAME",
    "MIN_IMAGE_SIDE",
    "PATIENT_SALT",
    "SPLITS",
    "UINT8_WINDOW",
    "DatasetSplit",
    "ImagePair",
    "PreparedDataset",
    "assign_splits",
    "find_image_pairs",
    "find_studies",
    "load_image_pair",
    "load_study_slices",
    "parse_example",
    "phantom_slices",
    "prepare_dataset",
    "pseudonym",
    "random_spec",
    "read_dataset",
    "study_patient",
]
