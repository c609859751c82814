"""Importers: real chest X-ray datasets converted to the llm-cxr schema.

Each importer streams rows into :func:`llm_cxr.data.dataset.write_dataset`, resizing
images with :func:`llm_cxr.data.images.to_model_size`, splitting by patient, and listing
every skipped item in ``bad_items.jsonl``. See ``data/README.md`` for the layouts and
commands.

=====================  ===================================================================
:func:`import_mimic`   MIMIC-CXR-JPG with the MIMIC-CXR reports (official split, CheXpert)
:func:`import_iu`      IU X-ray as on Kaggle (indiana_reports.csv, indiana_projections.csv)
:func:`import_table`   a CSV/TSV/JSONL/JSON table of image paths and report text
:func:`import_folder`  a folder of PNG/JPEG/DICOM images without text
=====================  ===================================================================
"""

from llm_cxr.data.importers.common import ImportOptions, LabelFn
from llm_cxr.data.importers.generic import import_folder, import_table
from llm_cxr.data.importers.iu import import_iu
from llm_cxr.data.importers.mimic import import_mimic

__all__ = ["ImportOptions", "LabelFn", "import_folder", "import_iu", "import_mimic", "import_table"]
