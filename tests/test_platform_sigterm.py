"""Issue 16.6 on the platform: a pod told to stop (SIGTERM: preemption, a scale-down, a redeploy)
during train_model. The adapter turns the signal into an exception at the training's next step, so
dtlpy's train_model does what it does on any failure: it uploads the training folder (our `save`:
the resume state) and marks the execution failed; the next train_model continues from the last
finished epoch to the weights an uninterrupted run ends with.

A real SIGTERM is sent to this process from dtlpy's progress callback at the end of epoch 1.
Only the network is fake (tests/fake_dataloop); no dtlpy method is patched. CI runs this file on
both dtlpy versions it claims (the platform suites).
"""
from __future__ import annotations

import os
import signal

import dtlpy as dl
import pytest

from adapters.clip_adapter import ClipAdapter, ClipAdapterFailure
from test_platform_contract import caption_dataset
from test_platform_flows import RESUME_CONFIG, make_model, new_pod


@pytest.fixture
def project(platform):
    return platform.add_project("clip-sigterm")


class SigtermAfterEpoch:
    """A dl.Progress as train_model's epoch callback uses it; sends this process SIGTERM at the end of
    the given epoch (1-based), as a kubelet would to a pod it stops."""

    def __init__(self, epoch: int):
        self.message = f"finished epoch: {epoch - 1}/"  # dtlpy's message counts from 0

    def update(self, progress=None, message=None, **kwargs):
        if message and message.startswith(self.message):
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_train_model_uploads_the_resume_state_and_the_next_training_continues(platform, project,
                                                                                            tmp_path):
    dataset = caption_dataset(platform, project)
    # resume_upload_minutes=0: no periodic upload; what the next training finds, dtlpy uploaded on failure
    model = make_model(platform, project, dataset, {**RESUME_CONFIG, "num_epochs": 2, "resume_upload_minutes": 0})
    new_pod(model, tmp_path, "pod-1")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ClipAdapterFailure, match="stopped by SIGTERM .* during epoch 2"):
        ClipAdapter().train_model(model, progress=SigtermAfterEpoch(1))
    assert signal.getsignal(signal.SIGTERM) == before  # the process's own handling is back
    assert "model.safetensors" not in platform.artifact_files(model.id)  # the model keeps its start weights
    assert [x for x, _ in platform.metric_points(model.id, "loss", "train")] == [1]
    platform.models[model.id]["status"] = "failed"  # what the platform does with a failed execution

    new_pod(model, tmp_path, "pod-2")
    ClipAdapter().train_model(dl.models.get(model_id=model.id))
    assert platform.models[model.id]["status"] == "trained"
    # it continued: epoch 2 only (an exact resume's weights: test_platform_flows' resume test)
    assert [x for x, _ in platform.metric_points(model.id, "loss", "train")] == [1, 2]
    assert "model.safetensors" in platform.artifact_files(model.id)
