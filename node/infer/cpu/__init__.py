"""The CPU as an inference device: what it has (features.py), which precision a bundle gets on it
(precision.py), the OpenVINO model cache (model_cache.py), the BF16 agreement check (agreement.py), and
what `engines doctor` says about it (doctor.py)."""
