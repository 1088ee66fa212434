"""A deterministic corpus of malformed DICOM input and protocol abuse, and how to judge the node's answer.

:func:`generate_cases` writes (under a work directory, from a seed) well over 500 cases built from a few
good synthetic CT slices (:mod:`tests.harness.synthetic_ct`), plus a few from the real third-party files
in ``../shared/data`` when that folder exists. Each :class:`Case` has a name, a category, a way of
sending it and an :class:`Expect`:

* ``cstore-bytes``: one malformed instance (byte-level truncation, wrong VR, absurd length, broken or
  undecodable pixel data, contradicting UIDs, wrong encoding) sent by C-STORE together with four good
  companion slices of the same series, all in one association. The bytes after the file meta are
  sent exactly as written (by :func:`send_files`, a small SCU of its own). Either the
  malformed instance is refused with a named failure status, or it is answered Success and the series
  it was filed under ends with a job error / an ignored-series note that names the problem.
* ``series``: instances that are each valid DICOM but together cannot form a volume (mixed sizes,
  orientations or studies, duplicate positions, gaps, variable spacing, no PixelSpacing, blank UIDs,
  multi-frame, undecodable or lossy pixel data, MR/SC when only CT models exist, tilt, ...).
* ``protocol``: raw-socket abuse of the upper layer (garbage PDUs, malformed A-ASSOCIATE-RQs, P-DATA
  that breaks the rules, half-sent datasets, aborted associations, peers that go quiet or never
  release). The expected reaction is named (rejected / aborted / closed / a DIMSE status), and where
  an instance was (partly) sent, whether it must or must not end up stored.

:func:`send_case` sends one case and returns a :class:`Sent`; :func:`evaluate` judges it against an
:class:`IndexView` of the node's index taken once the node has settled; :func:`format_table` prints
cases / outcomes / mismatches per category. Everything uses 127.0.0.1 only, and every wait is bounded.

The modules, each importing only those above it:

* :mod:`.cases`: the case model (:class:`Case`, :class:`Expect`, :class:`Sent`, protocol context and
  result, constants);
* :mod:`.mangle`: byte-level helpers (split a file, walk its elements, rewrite a VR or length, encode);
* :mod:`.pdu_peer`: the raw upper-layer peer (hand-made PDUs and command sets, :class:`Peer`);
* :mod:`.builder` and :mod:`.edits`: the corpus builder and the dataset edits the generators share;
* :mod:`.gen_bytes`, :mod:`.gen_dataset`, :mod:`.gen_series`, :mod:`.gen_shared`, :mod:`.gen_protocol`:
  the generators, run in turn by :mod:`.corpus` (:func:`generate_cases`);
* :mod:`.send`: sending cases; :mod:`.judge`: judging them and the table.
"""

from __future__ import annotations

from tests.harness.malformed.builder import COLS, PIXEL_MM, ROWS, SLICE_MM, SLICES
from tests.harness.malformed.cases import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    ENDS,
    ENHANCED_CT,
    MR_IMAGE_STORAGE,
    PET_IMAGE_STORAGE,
    REFUSED,
    RT_STRUCT,
    SECONDARY_CAPTURE,
    SEND_CSTORE,
    SEND_PROTOCOL,
    SEND_SERIES,
    Case,
    Expect,
    ProtocolContext,
    ProtocolResult,
    ProtocolScript,
    Sent,
    fail_or_refuse,
    job_error,
    refuse,
    words,
)
from tests.harness.malformed.corpus import generate_cases
from tests.harness.malformed.judge import (
    IndexView,
    SeriesView,
    Verdict,
    evaluate,
    format_table,
    read_instances,
    relevant_sops,
)
from tests.harness.malformed.mangle import (
    Elem,
    encode,
    file_meta_bytes,
    split_file,
    walk_explicit_le,
    with_length,
    with_vr,
)
from tests.harness.malformed.pdu_peer import (
    ABORT,
    APP_CONTEXT,
    RELEASE_RQ,
    VERIFICATION,
    Peer,
    associate_rq,
    c_echo_rq,
    c_store_rq,
    command_set,
    p_data,
    pdu,
)
from tests.harness.malformed.send import send_case, send_files

__all__ = [
    "ABORT",
    "APP_CONTEXT",
    "CANNOT_UNDERSTAND",
    "COLS",
    "DATASET_MISMATCH",
    "ENDS",
    "ENHANCED_CT",
    "MR_IMAGE_STORAGE",
    "PET_IMAGE_STORAGE",
    "PIXEL_MM",
    "REFUSED",
    "RELEASE_RQ",
    "ROWS",
    "RT_STRUCT",
    "SECONDARY_CAPTURE",
    "SEND_CSTORE",
    "SEND_PROTOCOL",
    "SEND_SERIES",
    "SLICES",
    "SLICE_MM",
    "VERIFICATION",
    "Case",
    "Elem",
    "Expect",
    "IndexView",
    "Peer",
    "ProtocolContext",
    "ProtocolResult",
    "ProtocolScript",
    "Sent",
    "SeriesView",
    "Verdict",
    "associate_rq",
    "c_echo_rq",
    "c_store_rq",
    "command_set",
    "encode",
    "evaluate",
    "fail_or_refuse",
    "file_meta_bytes",
    "format_table",
    "generate_cases",
    "job_error",
    "p_data",
    "pdu",
    "read_instances",
    "refuse",
    "relevant_sops",
    "send_case",
    "send_files",
    "split_file",
    "walk_explicit_le",
    "with_length",
    "with_vr",
    "words",
]
