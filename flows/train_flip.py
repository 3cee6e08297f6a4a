"""The train-flip flow: train FLIP on a release (facecap.training.flip_train), then evaluate it.

The training loop knows nothing of Prefect; this flow gives it a run in the
Prefect API (logs, state, parameters). Rerunning it with the same `out`
resumes from the latest checkpoint. Deployments (flows/deployments.py) start it
when a curate run completes, with release_dir = that run's OUT/release; locally
`facecap curate --then-train` does the same. Under torchrun (DDP) call
facecap.training.flip_train.train directly instead: one flow run per rank would
be noise.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger

from facecap.config import Config
from facecap.flows.eval_flip import eval_flip
from facecap.training.flip_data import ReleaseSplit
from facecap.training.flip_train import train


@flow(name="train-flip", flow_run_name="train-flip {out}", log_prints=True)
def train_flip(release_dir: str, out: str, config: dict | None = None) -> dict:
    """Train FLIP on RELEASE_DIR's train split into OUT (OUT/model, OUT/checkpoints, OUT/train_result.json).

    config: the facecap config as a mapping (only its `train`, `quality` and `image` sections are read).
    With train.evaluate on, the final model and its untrained baseline are evaluated on the test split
    into OUT/eval.json (and the release report, when the release has one).
    """
    logger = get_run_logger()
    cfg = Config.model_validate(config or {})
    result = train(release_dir, out, cfg, log=logger.info)
    if cfg.train.evaluate and result:
        test = ReleaseSplit(release_dir, "test", cfg.quality.test_fraction).count()
        if test.rows == 0:
            logger.warning(f"not evaluated: the release's test split is empty ({test.split_source})")
        else:
            result["eval"] = eval_flip(checkpoint=result["model_dir"], release_dir=release_dir,
                                       out=os.path.join(out, "eval.json"), config=config)
    return result
