"""``complete SERIES_UID``: declare a series complete, so the running service segments it at its next turn,
whatever the quiet period or the source's count (``[completeness]``) say."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from node.config import NodeConfig
from node.errors import NotFound
from node.model.records import SeriesState
from node.spool.queries import open_index


def cmd_complete(cfg: NodeConfig, args: argparse.Namespace) -> int:
    index = open_index(cfg)
    if index is None:
        print(f"no index at {cfg.index_path}: the service has not run with this state directory")
        return 1
    series = index.force_complete(args.series)
    if series is None:
        raise NotFound(f"series {args.series} is not in the index at {cfg.index_path}: it was never received here, "
                       "or retention deleted it")
    if series.state is not SeriesState.RECEIVING:
        print(f"series {series.series_uid} is already {series.state.value} ({series.note or 'no note'}); nothing to do")
        return 0
    print(f"series {series.series_uid} ({series.instance_count} instances) declared complete: the service "
          "segments it at its next turn")
    return 0


def add_series_parsers(sub: argparse._SubParsersAction, add_config: Callable[[argparse.ArgumentParser], None],
                       load: Callable[[argparse.Namespace], NodeConfig]) -> None:
    p = sub.add_parser("complete", help="declare a received series complete (segment it now)",
                       description=__doc__)
    add_config(p)
    p.add_argument("series", metavar="SERIES_UID", help="Series Instance UID of a series still receiving")
    p.set_defaults(func=lambda args: cmd_complete(load(args), args))
