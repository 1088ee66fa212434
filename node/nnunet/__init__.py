"""Importing nnU-Net v2 trained-model folders as node bundles (``dicom-seg-node bundles import-nnunet``).

``plans`` reads ``plans.json`` and ``dataset.json`` into typed settings (no torch needed), ``labels``
gives every label its SNOMED CT code from a ``--labels-map`` CSV, ``export`` rebuilds the network with
nnU-Net's own code and exports ONNX (needs the ``[import]`` extra: torch and nnunetv2), and ``bundle``
writes the manifest into a temporary folder and renames it into place at the end.
"""
