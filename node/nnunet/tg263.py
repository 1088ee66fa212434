"""AAPM TG-263 standard structure names for TotalSegmentator's classes: the RTSTRUCT ROI Name an imported
TotalSegmentator bundle gives each structure (the SEG keeps TotalSegmentator's name and the SNOMED CT code).

Source of the names: AAPM Report 263, "Standardizing Nomenclatures in Radiation Oncology" (2018), table of
target/OAR names (https://www.aapm.org/pubs/reports/RPT_263.pdf), as its spreadsheet is reproduced in HL7's
mCODE implementation guide ("TG263 to SNOMED CT codes and qualifiers" concept map). Laterality is the
``_L``/``_R`` suffix, vertebrae are ``VB_<level>`` with thoracic levels two-digit (``VB_T01``), ribs
``Rib<nn>_<side>``, lung lobes ``Lung_<side><lobe>``.

A TotalSegmentator class with no TG-263 name of the same extent is left out of :data:`TG263` on purpose
(see :data:`NO_TG263_NAME`); its ROI Name is then TotalSegmentator's own readable name. Choices worth
knowing: ``hip_left`` (the hip bone, os coxae) is ``Bone_Pelvic_L`` (TG-263 "Bony Pelvis Left");
``femur_left`` is the whole visible femur, ``Femur_L`` (not ``Femur_Head_L``, head and neck only);
``iliac_artery_left`` / ``iliac_vena_left`` are the common iliac vessels, ``A_Iliac_L`` / ``V_Iliac_L``.
A site whose templates use other names renames them in its node configuration.
"""

from __future__ import annotations

#: TotalSegmentator class name → TG-263 standard name.
TG263: dict[str, str] = {
    # organs (Dataset291 part "organs")
    "spleen": "Spleen",
    "kidney_right": "Kidney_R",
    "kidney_left": "Kidney_L",
    "gallbladder": "Gallbladder",
    "liver": "Liver",
    "stomach": "Stomach",
    "pancreas": "Pancreas",
    "adrenal_gland_right": "Glnd_Adrenal_R",
    "adrenal_gland_left": "Glnd_Adrenal_L",
    "lung_upper_lobe_left": "Lung_LUL",
    "lung_lower_lobe_left": "Lung_LLL",
    "lung_upper_lobe_right": "Lung_RUL",
    "lung_middle_lobe_right": "Lung_RML",
    "lung_lower_lobe_right": "Lung_RLL",
    "esophagus": "Esophagus",
    "trachea": "Trachea",
    "thyroid_gland": "Glnd_Thyroid",
    "small_bowel": "Bowel_Small",
    "duodenum": "Duodenum",
    "colon": "Colon",
    "urinary_bladder": "Bladder",
    "prostate": "Prostate",
    # vertebrae (Dataset292)
    "vertebrae_S1": "VB_S1",
    "vertebrae_L5": "VB_L5",
    "vertebrae_L4": "VB_L4",
    "vertebrae_L3": "VB_L3",
    "vertebrae_L2": "VB_L2",
    "vertebrae_L1": "VB_L1",
    "vertebrae_T12": "VB_T12",
    "vertebrae_T11": "VB_T11",
    "vertebrae_T10": "VB_T10",
    "vertebrae_T9": "VB_T09",
    "vertebrae_T8": "VB_T08",
    "vertebrae_T7": "VB_T07",
    "vertebrae_T6": "VB_T06",
    "vertebrae_T5": "VB_T05",
    "vertebrae_T4": "VB_T04",
    "vertebrae_T3": "VB_T03",
    "vertebrae_T2": "VB_T02",
    "vertebrae_T1": "VB_T01",
    "vertebrae_C7": "VB_C7",
    "vertebrae_C6": "VB_C6",
    "vertebrae_C5": "VB_C5",
    "vertebrae_C4": "VB_C4",
    "vertebrae_C3": "VB_C3",
    "vertebrae_C2": "VB_C2",
    "vertebrae_C1": "VB_C1",
    # cardiac and vessels (Dataset293)
    "heart": "Heart",
    "aorta": "A_Aorta",
    "pulmonary_vein": "V_Pulmonary",
    "brachiocephalic_trunk": "A_Brachiocephls",
    "subclavian_artery_right": "A_Subclavian_R",
    "subclavian_artery_left": "A_Subclavian_L",
    "common_carotid_artery_right": "A_Carotid_R",
    "common_carotid_artery_left": "A_Carotid_L",
    "brachiocephalic_vein_left": "V_Brachioceph_L",
    "brachiocephalic_vein_right": "V_Brachioceph_R",
    "superior_vena_cava": "V_Venacava_S",
    "inferior_vena_cava": "V_Venacava_I",
    "iliac_artery_left": "A_Iliac_L",
    "iliac_artery_right": "A_Iliac_R",
    "iliac_vena_left": "V_Iliac_L",
    "iliac_vena_right": "V_Iliac_R",
    # bones and the cord (Dataset294)
    "humerus_left": "Humerus_L",
    "humerus_right": "Humerus_R",
    "scapula_left": "Scapula_L",
    "scapula_right": "Scapula_R",
    "clavicula_left": "Clavicle_L",
    "clavicula_right": "Clavicle_R",
    "femur_left": "Femur_L",
    "femur_right": "Femur_R",
    "hip_left": "Bone_Pelvic_L",
    "hip_right": "Bone_Pelvic_R",
    "spinal_cord": "SpinalCord",
    "brain": "Brain",
    "skull": "Skull",
    # ribs (Dataset295)
    **{f"rib_left_{n}": f"Rib{n:02d}_L" for n in range(1, 13)},
    **{f"rib_right_{n}": f"Rib{n:02d}_R" for n in range(1, 13)},
}

#: TotalSegmentator ``total`` classes TG-263 has no name of the same extent for: they keep TotalSegmentator's
#: name as ROI Name. (A cyst is not the kidney; the appendage is not the whole atrium; "portal vein and
#: splenic vein" is two TG-263 structures; the muscles and cartilages are not in the TG-263 table.)
NO_TG263_NAME: tuple[str, ...] = (
    "kidney_cyst_left", "kidney_cyst_right", "sacrum", "atrial_appendage_left", "portal_vein_and_splenic_vein",
    "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left", "gluteus_medius_right",
    "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left", "autochthon_right", "iliopsoas_left",
    "iliopsoas_right", "sternum", "costal_cartilages",
)


def roi_name(totalseg_name: str) -> str:
    """The RTSTRUCT ROI Name for a TotalSegmentator class: its TG-263 name, else its own name."""
    return TG263.get(totalseg_name, totalseg_name)
