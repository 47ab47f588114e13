from pathlib import Path

import pytest
import torch

from keel.errors import ConfigError, TrainingError
from keel.settings import KeelSettings
from keel.train.config import ScalingSpec, TrainConfig
from keel.train.loop import evaluate_epoch, train_epoch
from keel.train.model import MLPClassifier, MLPSpec, load_model, parameter_count, save_model
from keel.train.scaling import DATA_PARALLEL_MIN_PARAMS, check_gpus_before_run, node_shape, resolve_scaling
from tests.processes import modules_loaded_by, ray_actor_pids
from tests.stages import small_config


@pytest.mark.parametrize("params, cpus, gpus, expected", [
    (10_000, 2, 0, {"num_workers": 1, "cpus_per_worker": 2, "use_gpu": False}),
    (10_000, 16, 0, {"num_workers": 1, "cpus_per_worker": 16, "use_gpu": False}),
    (DATA_PARALLEL_MIN_PARAMS, 8, 0, {"num_workers": 4, "cpus_per_worker": 2, "use_gpu": False}),
    (10_000, 8, 2, {"num_workers": 2, "cpus_per_worker": 4, "use_gpu": True}),
])
def test_auto_scaling_sizes_workers_by_model_and_hardware(params: int, cpus: int, gpus: int, expected: dict) -> None:
    assert resolve_scaling(ScalingSpec(), params, cpus, gpus) == expected


def test_explicit_scaling_is_kept() -> None:
    spec = ScalingSpec(num_workers=2, cpus_per_worker=1, use_gpu=False)
    assert resolve_scaling(spec, 10, 4, 1) == {"num_workers": 2, "cpus_per_worker": 1, "use_gpu": False}


def test_impossible_scaling_says_what_to_change() -> None:
    with pytest.raises(TrainingError, match="asks for 1 GPU worker.*has 0 GPU.*lower the pipeline's gpus"):
        resolve_scaling(ScalingSpec(use_gpu=True), 10, 2, 0)
    with pytest.raises(TrainingError, match="lower scaling.num_workers"):
        resolve_scaling(ScalingSpec(num_workers=3, cpus_per_worker=2), 10, 2, 0)


def test_on_an_autoscaling_cluster_a_request_beyond_the_nodes_up_waits_for_the_autoscaler(
        caplog: pytest.LogCaptureFixture) -> None:
    """gpus=N on the chart's RayCluster, whose GPU group is scaled to zero: the request brings it up."""
    gpu_job = ScalingSpec(num_workers=2, use_gpu=True)
    assert resolve_scaling(gpu_job, 10, 4, 0, autoscaling=True) == {"num_workers": 2, "cpus_per_worker": 1,
                                                                     "use_gpu": True}
    assert "waiting for the Ray autoscaler: 2 worker(s) x 1 CPU(s) + 1 GPU each asked for, 4 CPU(s) and 0 GPU(s)" \
        in caplog.text
    caplog.clear()
    resolve_scaling(ScalingSpec(), 10, 4, 0, autoscaling=True)  # fits what is up: nothing to wait for
    assert "waiting" not in caplog.text
    assert resolve_scaling(ScalingSpec(use_gpu=True), 10, 4, 0, autoscaling=True)["num_workers"] == 1
    wide = ScalingSpec(num_workers=3, cpus_per_worker=2)
    assert resolve_scaling(wide, 10, 2, 0, autoscaling=True) == {"num_workers": 3, "cpus_per_worker": 2,
                                                                 "use_gpu": False}
    with pytest.raises(TrainingError, match="has 0 GPU.*no autoscaler"):  # a local Ray gets no new nodes
        resolve_scaling(gpu_job, 10, 4, 0, autoscaling=False)


def test_a_gpu_request_beyond_what_the_cluster_can_grow_to_fails_at_once() -> None:
    """The chart writes KEEL_RAY_MAX_GPUS from its worker groups: without it a cluster with no GPU group would
    leave the step waiting for the autoscaler until its timeout."""
    gpu_job = ScalingSpec(num_workers=2, use_gpu=True)
    assert resolve_scaling(gpu_job, 10, 4, 0, autoscaling=True, max_gpus=4)["num_workers"] == 2  # waits, in reach
    for max_gpus in (0, 1):
        with pytest.raises(TrainingError, match=f"can grow to {max_gpus} GPU.*KEEL_RAY_MAX_GPUS.*gpus"):
            resolve_scaling(gpu_job, 10, 4, 0, autoscaling=True, max_gpus=max_gpus)
    assert resolve_scaling(ScalingSpec(), 10, 4, 0, autoscaling=True, max_gpus=0)["use_gpu"] is False  # auto
    with pytest.raises(TrainingError, match="asks for 2 GPU worker.*has 1 GPU"):  # nothing will add the second
        resolve_scaling(gpu_job, 10, 4, 1, autoscaling=False)


def test_a_worker_asks_for_no_more_cpus_than_one_node_has() -> None:
    """The prod overlay: two 4-CPU pods in the CPU group, 8-CPU pods with one GPU each in the GPU group."""
    pod = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1.0}}
    gpu_pod = {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}
    head = {"Alive": True, "Resources": {"memory": 1.0}}  # num-cpus 0
    gone = {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}
    assert node_shape([head, pod, pod, gone]) == (4, 0)
    assert node_shape([head, pod, pod, gpu_pod, gpu_pod]) == (8, 8)
    small_model = resolve_scaling(ScalingSpec(), 10_000, 8, 0, autoscaling=True, node_cpus=4)
    assert small_model == {"num_workers": 1, "cpus_per_worker": 4, "use_gpu": False}
    on_gpus = resolve_scaling(ScalingSpec(), 10_000, 24, 2, autoscaling=True, node_cpus=8, node_cpus_per_gpu=8)
    assert on_gpus == {"num_workers": 2, "cpus_per_worker": 8, "use_gpu": True}
    assert resolve_scaling(ScalingSpec(), 10_000, 16, 0, node_cpus=16)["cpus_per_worker"] == 16  # one machine


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="learning_rat"):
        TrainConfig.model_validate({"learning_rat": 0.1})


@pytest.mark.parametrize("scaling, problems", [
    ({"num_workers": 0}, "train.scaling.num_workers: 0 should be greater than 0 or 'auto'"),
    ({"cpus_per_worker": 1.5}, "train.scaling.cpus_per_worker: 1.5 should be a valid integer or 'auto'"),
    ({"num_workers": "many", "use_gpu": "sometimes"}, "train.scaling.num_workers: 'many' should be a valid integer "
     "or 'auto'; train.scaling.use_gpu: 'sometimes' should be a valid boolean or 'auto'"),
])
def test_a_scaling_value_that_is_neither_a_count_nor_auto_gets_one_problem_each(scaling: dict, problems: str) -> None:
    """A worker count of 0 used to pass here and fail in the train step; a bad value read as one problem per
    member of the field's union (``num_workers.int: ...; num_workers.literal['auto']: ...``)."""
    with pytest.raises(ConfigError) as caught:
        small_config(train={"scaling": scaling})
    assert str(caught.value).endswith(f"invalid pipeline config: {problems}")


def _separable(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, 4, generator=generator)
    return features, (features[:, 0] + features[:, 1] > 0).long()


def test_training_steps_learn_a_separable_problem() -> None:
    torch.manual_seed(0)
    features, labels = _separable()
    model = MLPClassifier(MLPSpec(input_dim=4, hidden_sizes=[16], num_classes=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    first = train_epoch(model, optimizer, features, labels, 32, generator)
    for _ in range(20):
        last = train_epoch(model, optimizer, features, labels, 32, generator)
    loss_sum, correct, count = evaluate_epoch(model, features, labels)
    assert last < first / 2
    assert count == 256 and correct / count > 0.95 and loss_sum / count < first


def test_model_roundtrip_needs_no_pickle(tmp_path) -> None:
    spec = MLPSpec(input_dim=3, hidden_sizes=[5, 4], num_classes=3, dropout=0.2)
    model = MLPClassifier(spec)
    save_model(model, spec, tmp_path)
    loaded = load_model(tmp_path)
    inputs = torch.randn(7, 3)
    assert torch.equal(loaded(inputs), model.eval()(inputs))
    assert parameter_count(loaded) == 3 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3


def test_a_checkpoint_holds_the_best_weights_once(tmp_path) -> None:
    from keel.train.loop import STATE_FILE, TrainState, keep_best, read_checkpoint, write_checkpoint

    model = MLPClassifier(MLPSpec(input_dim=3, hidden_sizes=[64], num_classes=2, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(epoch=1)
    keep_best(state, model)  # epoch 1 is the best so far: its weights are the model's
    improving, worse = tmp_path / "improving", tmp_path / "worse"
    improving.mkdir(), worse.mkdir()
    write_checkpoint(improving, model, optimizer, state)
    assert torch.load(improving / STATE_FILE, weights_only=False)["state"].best_weights is None
    assert state.best_weights is not None  # the worker's own state keeps its copy
    weights, _, restored = read_checkpoint(improving)
    assert restored.best_epoch == 1 and all(torch.equal(restored.best_weights[k], weights[k]) for k in weights)

    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    state.epoch = 2  # a worse epoch: the best weights are no longer the model's, so they are written
    write_checkpoint(worse, model, optimizer, state)
    weights, _, restored = read_checkpoint(worse)
    assert all(torch.equal(restored.best_weights[k], best[k]) for k in best)
    first = next(iter(best))
    assert not torch.equal(weights[first], best[first])
    assert (worse / STATE_FILE).stat().st_size > 1.3 * (improving / STATE_FILE).stat().st_size


def test_gpus_that_can_never_be_had_fail_before_the_first_step(tmp_path: Path) -> None:
    """Without KEEL_RAY_ADDRESS, against the GPUs this machine has; on an autoscaling cluster, against what it
    can grow to; a fixed cluster is only known once connected (tune checks it)."""
    local = KeelSettings(home=tmp_path)
    check_gpus_before_run(0, local)
    with pytest.raises(TrainingError, match="asks for 999 GPU worker.*but this machine"):
        check_gpus_before_run(999, local)
    cluster = KeelSettings(home=tmp_path, ray_address="ray://head:10001", ray_max_gpus=2)
    check_gpus_before_run(2, cluster)
    with pytest.raises(TrainingError, match="can grow to 2 GPU"):
        check_gpus_before_run(3, cluster)
    check_gpus_before_run(3, cluster.model_copy(update={"ray_max_gpus": None}))  # unknown: the autoscaler's call
    check_gpus_before_run(999, cluster.model_copy(update={"ray_autoscaling": False}))  # known once connected


def test_the_private_rays_workers_run_at_the_steps_own_priority_and_none_idle(settings: KeelSettings) -> None:
    """Ray starts its workers at nice 15, where any busy process on the machine takes their CPU: beside two
    busy loops, a training run that takes 18 s alone took 198 s (31 s at the step's priority). And it
    starts idle workers for the first driver, within a second, that Ray Train's actors never use."""
    import os
    import time

    import ray

    from keel.train.trainer import ray_session

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    with ray_session(settings):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert ray_actor_pids("IDLE") == []
            time.sleep(0.2)
        assert ray.get(niceness.remote()) == os.nice(0)


def test_importing_the_ray_session_leaves_ray_train_unloaded() -> None:
    """tune, batch scoring and the job runner take ray_session from keel.train.trainer; ray.train is a second of
    imports that only a training run needs."""
    assert modules_loaded_by("import keel.train.trainer", ("ray.train",)) == []
