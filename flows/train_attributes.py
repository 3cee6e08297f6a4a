"""The train-attributes flow: a Prefect flow around facecap.training.attributes.train_attributes.

Progress lines go to the Prefect run's logs (and the console); the training
function itself knows nothing of Prefect. Rerunning the flow with the same
output directory resumes from its latest checkpoint.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from facecap.config import Config
from facecap.training.attributes import train_attributes


@flow(name="train-attributes", flow_run_name="train-attributes {out}", log_prints=True)
def train_attributes_flow(data: str, out: str, config: dict | None = None, fresh: bool = False) -> dict:
    """Fine-tune the attribute classifier on CelebA-format data at `data`; write OUT/model (see the CLI's --help)."""
    logger = get_run_logger()
    cfg = Config.model_validate(config or {})
    return train_attributes(data, out, cfg, log=logger.info, fresh=fresh)
