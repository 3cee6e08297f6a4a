"""The `takedown` flow: `facecap takedown` as a Prefect flow, so a takedown can be run from the UI.

It finds the person's records in OUT's release, adds them to the exclusion
list and re-runs the release's curate as a subflow (every shard cached; the
list applied release-wide; validated and promoted by one rename), then
records the takedown in the manifest. Photos are paths readable where the
flow runs; the audit log never holds them or their face hashes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from facecap.commands.takedown import takedown as run_takedown


@flow(name="takedown", flow_run_name="takedown {out}", log_prints=True)
def takedown(out: str, images: list[str] | None = None, urls: list[str] | None = None,
             sample_ids: list[str] | None = None, dry_run: bool = False) -> dict:
    """Take the faces matching `images`, `urls` and `sample_ids` out of OUT's release (see `facecap takedown`)."""
    logger = get_run_logger()
    result = run_takedown(out, images or [], urls or [], sample_ids or [], dry_run=dry_run, log=logger.info)
    if result.left:
        raise RuntimeError(f"{len(result.left)} matched record(s) are still in the release: {result.left[:5]}")
    return {"status": result.status, "matched": [m.sample_id for m in result.matches], "removed": result.removed,
            "entries_added": len(result.entries), "records_before": result.records_before,
            "records_after": result.records_after, "release_before": result.release_before,
            "release_after": result.release_after, "exclusion_list": result.exclusion_list}
