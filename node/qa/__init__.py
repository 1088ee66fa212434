"""Edit QA: an edited structure set that comes back, measured against the node's own result.

``match`` pairs ROIs by name (``[qa]`` aliases), ``metrics`` measures overlap and surface distances with
SimpleITK, ``verdict`` judges each structure, ``checks`` names what is wrong with a clinician's contours,
``compare`` puts them together for one edited set, and ``report`` summarises the stored results.
"""
