"""`facecap train`, `facecap eval` and `facecap curate --then-train` under a real Prefect API (the test harness)."""

from __future__ import annotations

import json

import pytest

from facecap.cli import main
from facecap.training.flip_data import release_fingerprint
from facecap.training.flip_synthetic import write_synthetic_release

TINY = ["--profile", "offline", "--model-size", "tiny", "--batch-size", "8", "--set", "train.max_text_tokens=16",
        "--set", "train.queue_size=16", "--set", "train.num_workers=0", "--set", "train.threads=1",
        "--set", "train.probe_epochs=5"]


def flow_run_states(name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name])))
    return [r.state.type.value for r in runs]


# No capsys in tests that run flows: Prefect's console log handler keeps the stream it first saw, and capsys
# closes its stream after the test.
def test_train_and_eval_commands_end_to_end(prefect_api_url, tmp_path):
    release = tmp_path / "release"
    write_synthetic_release(str(release), train_per_class=2)
    out = tmp_path / "flip"
    assert main(["train", str(release), "--out", str(out), "--steps", "3", *TINY]) == 0
    result = json.loads((out / "train_result.json").read_text())
    assert result["steps"] == 3 and result["release_hash"] == release_fingerprint(str(release))
    assert result["pretrained_weights"] is False
    trained_eval = json.loads((out / "eval.json").read_text())
    assert set(trained_eval) >= {"model", "baseline", "note"}
    # The flows ran in the Prefect API and completed.
    assert "COMPLETED" in flow_run_states("train-flip") and "COMPLETED" in flow_run_states("eval-flip")

    # Rerunning with more steps resumes from the last checkpoint.
    assert main(["train", str(release), "--out", str(out), "--steps", "4", "--no-eval", *TINY]) == 0
    assert json.loads((out / "train_result.json").read_text())["resumed_from_step"] == 3

    report = tmp_path / "eval.json"
    assert main(["eval", str(out / "model"), str(release), "--json", str(report), "--profile", "offline",
                 "--set", "train.num_workers=0", "--set", "train.probe_epochs=5", "--no-baseline"]) == 0
    results = json.loads(report.read_text())
    assert results["trained_on"]["steps"] == 4 and "baseline" not in results
    assert results["model"]["retrieval"]["samples"] == 8


def test_user_errors_exit_2_with_a_message(prefect_api_url, tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "is not a directory" in capsys.readouterr().err
    release = tmp_path / "release"
    write_synthetic_release(str(release), train_per_class=1)
    assert main(["eval", str(tmp_path), str(release), "--profile", "offline"]) == 2
    assert "not a FLIP checkpoint" in capsys.readouterr().err


def test_curate_then_train_trains_on_the_new_release(prefect_api_url, example_dir, tmp_path):
    out = tmp_path / "run"
    # The example folder repeats one portrait: dedup.keep=all leaves the training a batch of faces, and
    # quality.test_fraction=0 keeps them in train (as one near-duplicate cluster they share one split).
    code = main(["curate", str(example_dir / "folder"), "--out", str(out), "--workers", "1", "--then-train",
                 "--set", "dedup.keep=all", "--set", "quality.test_fraction=0",
                 "--set", "train.steps=1", "--set", "train.batch_size=2", "--set", "train.model_size=tiny",
                 "--profile", "offline", *TINY[6:]])
    assert code == 0
    trained = json.loads((out / "flip" / "model" / "trained_on.json").read_text())
    assert trained["release_hash"] == release_fingerprint(str(out / "release"))
    assert trained["steps"] == 1 and trained["train_split"]["rows"] >= 2


@pytest.mark.parametrize("flag", ["--help"])
def test_help_texts_explain_the_commands(flag, capsys):
    for command, words in (("train", ["RELEASE_DIR", "--out", "resumes", "torchrun", "random init", "split"]),
                           ("eval", ["R@1/5/10", "baseline", "linear probe", "report"])):
        with pytest.raises(SystemExit):
            main([command, flag])
        text = capsys.readouterr().out
        for word in words:
            assert word in text, (command, word)
