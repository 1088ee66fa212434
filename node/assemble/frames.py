"""One frame of reference for a series whose instances carry several.

De-identification tools that replace every UID independently give each instance of a series its
own FrameOfReferenceUID, although the scanner placed them all in one. When the geometry says they
are one stack — one orientation (checked before) and evenly spaced positions along the normal — the
series is segmented and the results carry one of the UIDs, chosen by a stated rule: **the UID most
instances carry; if several are carried by equally many, the first slice's (lowest along the
normal)**, the one the SEG's first frame and the RTSTRUCT's first contour image come from. The rule
depends only on the series' contents (not on arrival order), so a resend gives the same results.
The choice goes into the volume's notes (the job record) and the log. An uneven stack with mixed
frames is refused: nothing then shows the positions belong together. ``[assemble]
mixed_frames_of_reference = "decline"`` declines such series instead, with the reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from node.errors import Declined, VolumeError
from node.model.volume import MixedFrames

KEYWORD = "FrameOfReferenceUID"


def _shown(counts: Counter[str]) -> str:
    top = [f"{uid or '(empty)'!r} ({n} instance{'s' if n > 1 else ''})" for uid, n in counts.most_common(2)]
    more = len(counts) - len(top)
    return ", ".join(top) + (f" and {more} more" if more > 0 else "")


def settle_frame_of_reference(frames: Sequence[str], *, uniform: bool, spacing_mm: float,
                              policy: MixedFrames) -> tuple[str, str]:
    """(the UID the results carry, a note for the user; '' when every instance carries the same).

    ``frames`` are the instances' FrameOfReferenceUIDs in slice order ('' where empty). Raises
    :class:`Declined` under the DECLINE policy and :class:`VolumeError` when the slices are not evenly spaced.
    """
    counts = Counter(frames)
    if len(counts) == 1:
        return next(iter(counts)), ""
    n = len(frames)
    mixed = f"the series' {n} instances carry {len(counts)} different {KEYWORD} values ({_shown(counts)})"
    if policy is MixedFrames.DECLINE:
        raise Declined(f"{mixed}; [assemble] mixed_frames_of_reference = \"decline\" declines such a series "
                       "(\"segment\" segments it with one of them when its slices form one regular stack)")
    if not uniform:
        raise VolumeError(f"the series mixes {KEYWORD} values ({_shown(counts)}) and its slices are not evenly "
                          "spaced: nothing shows its instances were placed in one frame of reference, so they "
                          "cannot form one volume")
    candidates = Counter({uid: c for uid, c in counts.items() if uid})
    if not candidates:  # every value empty is not a mix; kept for completeness
        return "", ""
    best = max(candidates.values())
    tied = [uid for uid, c in candidates.items() if c == best]
    if len(tied) == 1:
        chosen = tied[0]
        why = f"the one most instances carry ({best} of {n})"
    else:
        chosen = next(uid for uid in frames if uid in tied)
        why = (f"the first slice's along the normal (no value is carried by more instances than the others: "
               f"{best} of {n} at most)")
    note = (f"{mixed} but they form one regular stack (one orientation, {n} slices {spacing_mm:.2f} mm apart): "
            f"the results are written in one frame of reference, {chosen}, {why}")
    return chosen, note
