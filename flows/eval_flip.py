"""The eval-flip flow: retrieval R@1/5/10 and the attribute probe of a FLIP checkpoint, with its baseline."""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from facecap.config import Config
from facecap.training.flip_eval import evaluate


@flow(name="eval-flip", flow_run_name="eval-flip {checkpoint}", log_prints=True)
def eval_flip(checkpoint: str, release_dir: str, out: str | None = None, config: dict | None = None) -> dict:
    """Evaluate CHECKPOINT (a FLIP model directory) on RELEASE_DIR's test split.

    out: a .json file, or a directory that gets eval.json (default: CHECKPOINT/eval.json). The results also
    go into RELEASE_DIR/report when the release has one.
    """
    cfg = Config.model_validate(config or {})
    if out and not out.endswith(".json"):
        out = os.path.join(out, "eval.json")
    return evaluate(checkpoint, release_dir, cfg, out_json=out, log=get_run_logger().info)
