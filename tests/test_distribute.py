"""tf.distribute: strategy choice, sharding, our own training loop, two workers."""

import json
import os
import random
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json, shared_path

from tftransfer import Distiller, ServedModel
from tftransfer.distill import INPUTS, TEACHER_LOGITS
from tftransfer.distribute import distributed_fit
from tftransfer.examples import feature_dataset
from tftransfer.workers import Workers, cluster_tasks, make_strategy

# What a finished run folder holds: no worker folder, checkpoint or lock left.
FINISHED_RUN = sorted(["data_report.json", "history.csv", "labels.txt", "logs",
                       "metrics.json", "model.keras", "predictions.csv", "report",
                       "saved_model"])


def test_strategy_names_and_tf_config_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        make_strategy("multi_worker")
    assert isinstance(make_strategy("auto"), type(tf.distribute.get_strategy()))
    assert Workers.of(make_strategy("mirrored")).name == "mirrored"
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG must be JSON"):
        cluster_tasks()
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
         "task": {"type": "worker", "index": 0}}))
    assert cluster_tasks() == 3


def _batches(dataset):
    return [tuple(t.numpy() for t in batch) for batch in dataset]


def test_lockstep_gives_every_worker_as_many_steps_and_masks_padding():
    total, global_batch = 11, 2
    x = np.arange(total, dtype="float32")[:, None]
    y = np.arange(total, dtype="int32") % 2
    seen = []
    steps = set()
    for index in range(3):
        workers = Workers(tf.distribute.get_strategy(), index, 3)
        shard = feature_dataset(x[index::3], y[index::3], 3)
        batches = _batches(workers.lockstep(shard, total, global_batch))
        steps.add(len(batches))
        # 11 images over 3 workers: shards of 4, 4, 3; the last one is padded
        # with one masked copy. Batches are of the global size: tf.distribute
        # cuts each into one piece per replica.
        assert all(len(b[0]) == global_batch for b in batches)
        masks = np.concatenate([b[2] for b in batches])
        assert masks.sum() == len(range(index, total, 3))
        assert (masks == 0).sum() == (1 if index == 2 else 0)
        seen.extend(np.concatenate([b[0] for b in batches])[masks == 1, 0].tolist())
    assert steps == {2}
    assert sorted(seen) == list(range(total))
    with pytest.raises(ValueError, match="at least one"):
        Workers(tf.distribute.get_strategy(), 2, 3).lockstep(
            feature_dataset(x[:0], y[:0], 2), 2, 4)


def _compiled_head(seed):
    from tftransfer.train import compile_classifier

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    compile_classifier(model, 1e-2)
    return model


def test_own_loop_trains_like_keras_fit():
    """One worker through `distributed_fit` takes Keras `fit`'s steps exactly."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)).astype("float32")
    y = (x[:, 0] > -0.5).astype("int32") + (x[:, 0] > 0.5).astype("int32")
    class_weight = {0: 1.0, 1: 2.0, 2: 3.0}
    reference, ours = _compiled_head(1), _compiled_head(1)
    before = [w.copy() for w in ours.get_weights()]
    fitted = reference.fit(feature_dataset(x, y, 16), validation_data=feature_dataset(
        x, y, 16), epochs=20, class_weight=class_weight, shuffle=False, verbose=0)
    workers = Workers(tf.distribute.get_strategy())
    history = distributed_fit(
        workers, ours, workers.lockstep(feature_dataset(x, y, 16), 50, 16),
        workers.lockstep(feature_dataset(x, y, 16), 50, 16), epochs=20,
        class_weight=class_weight, verbose=0)
    for a, b, c in zip(reference.get_weights(), ours.get_weights(), before):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert not np.allclose(b, c)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(history.history[key], fitted.history[key],
                                   rtol=1e-4, atol=1e-5)
    assert history.history["val_accuracy"][-1] > 0.8


def _raw_tf_loss(y, logits):
    # Plain TensorFlow: it needs the labels as `Loss.__call__` passes them.
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, "int32"), logits)


def _distiller(seed, student_loss=None):
    keras.utils.set_random_seed(seed)
    student = keras.Sequential([keras.Input((6,)), keras.layers.Dense(
        3, kernel_regularizer=keras.regularizers.L2(0.05))])
    distiller = Distiller(None, student, temperature=2.0, student_loss_weight=0.3)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), student_loss=student_loss)
    return distiller


@pytest.mark.parametrize("student_loss", [None, _raw_tf_loss])
def test_own_loop_distils_like_keras_fit(student_loss):
    """`Distiller.example_losses` in our loop: `Distiller.fit`'s steps and logs,
    with class weights, a regularized student, a Keras loss or a function."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    teacher_logits = rng.normal(size=(40, 3)).astype("float32") * 3

    def batches():
        return tf.data.Dataset.from_tensor_slices(
            ({INPUTS: x, TEACHER_LOGITS: teacher_logits}, y)).batch(16)

    class_weight = {0: 1.0, 1: 0.5, 2: 2.0}
    reference, ours = _distiller(2, student_loss), _distiller(2, student_loss)
    before = [w.copy() for w in ours.get_weights()]
    fitted = reference.fit(batches(), validation_data=batches(), epochs=5,
                           class_weight=class_weight, shuffle=False, verbose=0)
    workers = Workers(tf.distribute.get_strategy())
    history = distributed_fit(
        workers, ours, workers.lockstep(batches(), 40, 16),
        workers.lockstep(batches(), 40, 16), epochs=5, class_weight=class_weight,
        verbose=0, example_losses=ours.example_losses)
    for a, b, c in zip(reference.get_weights(), ours.get_weights(), before):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert not np.allclose(b, c)
    assert sorted(history.history) == sorted(fitted.history)
    for key, values in fitted.history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-4,
                                   atol=1e-5, err_msg=key)


def test_own_loop_refuses_a_student_loss_it_would_average_differently():
    distiller = _distiller(0, keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum"))
    x = {INPUTS: np.zeros((4, 6), "float32"),
         TEACHER_LOGITS: np.zeros((4, 3), "float32")}
    with pytest.raises(ValueError, match="reduction='sum'"):
        distiller.example_losses(x, np.zeros(4, "int32"), distiller(x))


# A fresh process: the two logical CPUs must be set before TensorFlow starts.
_OVERFLOW_ON_ONE_REPLICA = """
import json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from tftransfer.distribute import distributed_fit
from tftransfer.workers import Workers
from tftransfer.train import compile_classifier

keras.config.set_dtype_policy("mixed_float16")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(3, dtype="float32")])
    compile_classifier(model, 1e-2)
    model.optimizer.build(model.trainable_variables)
rng = np.random.default_rng(0)
x = rng.normal(size=(16, 6)).astype("float32")
y = rng.integers(0, 3, 16).astype("int32")
bad = x.copy()
bad[12] = 1e6  # beyond float16, in the second replica's half of the batch
workers = Workers(strategy)

def data(x):
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    return workers.lockstep(batches, 16, 16)

def replicas():
    return [[v.numpy().tolist() for v in strategy.experimental_local_results(w.value)]
            for w in model.trainable_variables]

before = replicas()
scale = float(model.optimizer.dynamic_scale.numpy())
distributed_fit(workers, model, data(bad), data(x), epochs=1, verbose=0)
skipped = replicas()
skipped_scale = float(model.optimizer.dynamic_scale.numpy())
distributed_fit(workers, model, data(x), data(x), epochs=1, verbose=0)
print(json.dumps([before, skipped, replicas(), scale, skipped_scale]))
"""


def test_an_overflow_on_one_replica_skips_the_step_on_all():
    """Under mixed float16 the LossScaleOptimizer skips a step whose gradients
    overflow; our loop makes every replica skip it when one overflows, or the
    replicas' weights would part ways."""
    done = subprocess.run([sys.executable, "-c", _OVERFLOW_ON_ONE_REPLICA],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    before, skipped, trained, scale, skipped_scale = json.loads(
        done.stdout.splitlines()[-1])
    assert skipped == before  # on both replicas
    assert skipped_scale == scale / 2
    for first, second in trained:  # the next step trains both alike
        assert first == second
    assert trained != before


def test_mirrored_strategy_trains_like_the_default_one_and_exports(
        trained_run, scenes_dir, tmp_path):
    from tftransfer.run import TrainConfig, train_run

    # The default strategy's run of these settings is conftest's `trained_run`
    # (VGG16, random weights, 32 px, 15 epochs at 0.01, the CLI's "auto"
    # strategy, which is the default one without GPUs or TF_CONFIG).
    with open(os.path.join(trained_run, "metrics.json")) as handle:
        default = json.load(handle)
    mirrored = train_run(TrainConfig(
        scenes_dir, output=str(tmp_path / "mirrored"), backbone="vgg16",
        weights=None, image_size=32, epochs=15, learning_rate=0.01,
        strategy="mirrored", verbose=0)).summary
    assert mirrored["settings"] == default["settings"]  # all but the strategy
    assert default["strategy"] == "default"
    assert mirrored["strategy"] == "mirrored"
    assert mirrored["num_replicas_in_sync"] == max(
        1, len(tf.config.list_logical_devices("GPU")))
    # Dropout draws differ under a strategy, so the runs agree in outcome only.
    assert default["val_accuracy"] >= 0.9
    assert mirrored["val_accuracy"] >= 0.9
    served = tf.saved_model.load(mirrored["saved_model"])
    assert "serving_default" in served.signatures


def _free_ports(count):
    """Ports free now, below the kernel's ephemeral range.

    They are closed again before the workers bind them; outside the ephemeral
    range no other process's outgoing connection or `bind(0)` takes one in
    between.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            ephemeral = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    rng = random.Random()
    ports = []
    while len(ports) < count:
        port = rng.randrange(10000, max(ephemeral, 10001))
        with socket.socket() as probe:
            try:
                probe.bind(("localhost", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


MOBILENET_V2 = ("--backbone", "mobilenet_v2", "--alpha", "0.35")


def _start_workers(run, data, *args, extra=((), ()), model=MOBILENET_V2,
                   chief_job=False, command="train"):
    """Two `tftransfer train --strategy multi_worker` processes on loopback ports.

    The first is worker 0, or with `chief_job` the cluster's `chief` task.
    `command` may be `"distill"`, its teacher and student in `model`.
    """
    first, second = (f"localhost:{port}" for port in _free_ports(2))
    if chief_job:
        cluster = {"chief": [first], "worker": [second]}
        tasks = [("chief", 0), ("worker", 0)]
    else:
        cluster = {"worker": [first, second]}
        tasks = [("worker", 0), ("worker", 1)]
    processes = []
    for (task_type, index), more in zip(tasks, extra):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": task_type, "index": index}}))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "tftransfer", command, data, "--output", run,
             *model, "--strategy", "multi_worker", "--json", *args, *more],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return processes


def _finish(processes, timeout=420):
    """`(returncode, stdout, stderr)` of each; kills all if one overruns."""
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append((process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


@pytest.mark.shared
def test_two_workers_train_one_model_on_hymenoptera(tmp_path):
    """Issue 7's acceptance: two loopback workers, `--strategy multi_worker`."""
    data = shared_path("data", "hymenoptera")
    run = str(tmp_path / "run")
    outputs = []
    for code, stdout, stderr in _finish(_start_workers(run, data, "--epochs", "5")):
        assert code == 0, stderr[-3000:]
        outputs.append(last_json(stdout))
        # A step takes the global batch, 32, from the two workers together:
        # 245 training images make 8 steps.
        assert "Epoch 5/5 - 8 steps" in stdout
    chief, worker = outputs
    for summary in outputs:
        assert summary["strategy"] == "multi_worker"
        assert summary["num_replicas_in_sync"] == 2
        assert summary["num_workers"] == 2
    assert chief["is_chief"] and not worker["is_chief"]
    assert worker["saved_model"] is None
    # Both trained the same model, weight for weight.
    assert chief["weights_sha256"] == worker["weights_sha256"]
    # Each image's features were computed by one worker only.
    assert chief["features"]["computed"] + chief["features"]["hits"] == 123 + 77
    assert chief["val_accuracy"] >= 0.85
    assert sorted(os.listdir(run)) == FINISHED_RUN
    served = tf.saved_model.load(chief["saved_model"])
    bees = os.path.join(data, "val", "bees")
    files = sorted(os.listdir(bees))[:8]
    contents = tf.constant([open(os.path.join(bees, f), "rb").read() for f in files])
    out = served.signatures["serving_default"](image_bytes=contents)
    labels = [label.decode() for label in out["class_names"].numpy()]
    assert labels.count("bees") >= 6


def test_killed_workers_resume_from_the_chiefs_checkpoint(scenes_dir, tmp_path):
    run = tmp_path / "run"
    history = run / "history.csv"
    # Fine-tuning epochs: slow enough (the top on activations) to land in.
    args = ("--epochs", "2", "--fine-tune-epochs", "6", "--fine-tune-layers", "3",
            "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"))
    model = ("--backbone", "vgg16", "--weights", "none", "--image-size", "32")
    processes = _start_workers(str(run), scenes_dir, *args, model=model)
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if history.exists() and len(history.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    for process in processes:
        process.kill()
        process.wait()
    done = len(history.read_text().splitlines()) - 1
    assert 3 <= done < 8, "the kill should land mid-run"
    outputs = _finish(_start_workers(str(run), scenes_dir, *args, model=model))
    resumed = set()
    for code, stdout, stderr in outputs:
        assert code == 0, stderr[-3000:]
        resumed.add(last_json(stdout)["resumed_from_epoch"])
    # The chief writes an epoch's history row before its checkpoint, so a
    # kill between the two resumes one epoch behind the history.
    assert len(resumed) == 1
    checkpointed = resumed.pop()
    assert checkpointed in (done, done - 1)
    for _, stdout, _ in outputs:
        assert f"Resuming from epoch {checkpointed}" in stdout
    epochs = [row.split(",")[0] for row in history.read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 9)]
    assert sorted(os.listdir(run)) == FINISHED_RUN


def test_a_terminated_worker_stops_the_others_and_all_resume(scenes_dir, tmp_path):
    """SIGTERM to worker 1 mid-run (a scheduler preempting its machine): it
    stops at once (exit 143, how to resume); the chief, its peer gone, stops
    within a minute saying so (exit 2) instead of waiting forever; started
    again, both resume and every epoch is recorded once."""
    import signal

    run = tmp_path / "run"
    history = run / "history.csv"
    model = ("--backbone", "vgg16", "--weights", "none", "--image-size", "32")
    # Fine-tuning epochs: slow enough (the top on activations) to land in.
    args = ("--epochs", "2", "--fine-tune-epochs", "8", "--fine-tune-layers", "2",
            "--batch-size", "8", "--no-report")
    chief, worker = _start_workers(str(run), scenes_dir, *args, model=model)
    deadline = time.time() + 300
    while time.time() < deadline and chief.poll() is None and worker.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    stopped = time.time()
    (chief_code, _, chief_err), (code, _, stderr) = _finish([chief, worker], timeout=120)
    assert code == 143 and "stopped by SIGTERM" in stderr, stderr[-2000:]
    assert "run the same command to resume" in stderr
    assert chief_code == 2, chief_err[-2000:]
    assert "Lost contact with the other workers" in chief_err
    assert "Start every worker again with the same command" in chief_err
    assert time.time() - stopped < 60
    done = len(history.read_text().splitlines()) - 1
    assert 3 <= done < 10, "the signal should land mid-run"
    outputs = _finish(_start_workers(str(run), scenes_dir, *args, model=model))
    for code, stdout, stderr in outputs:
        assert code == 0, stderr[-3000:]
        assert last_json(stdout)["resumed_from_epoch"] in (done, done - 1)
    epochs = [row.split(",")[0] for row in history.read_text().splitlines()[1:]]
    assert epochs == [str(e) for e in range(1, 11)]


@pytest.mark.shared
def test_a_worker_with_other_settings_is_refused(tmp_path):
    data = shared_path("data", "hymenoptera")
    run = str(tmp_path / "run")
    (chief_code, _, chief_err), (code, _, stderr) = _finish(_start_workers(
        run, data, "--epochs", "2", extra=((), ("--seed", "1"))))
    assert code == 2 and "other settings or images than the chief" in stderr
    assert "seed: 0 on the chief, 1 here" in stderr
    assert chief_code == 2 and "Lost contact with the other workers" in chief_err
    assert not os.path.exists(os.path.join(run, "metrics.json"))


def test_a_cluster_with_a_chief_task_trains_one_model(scenes_dir, tmp_path):
    """TF_CONFIG may name a `chief` job: that task writes the run folder."""
    run = str(tmp_path / "run")
    outputs = []
    for code, stdout, stderr in _finish(_start_workers(
            run, scenes_dir, "--epochs", "15", "--learning-rate", "0.01",
            "--fine-tune-epochs", "1", "--fine-tune-layers", "3", chief_job=True,
            model=("--backbone", "vgg16", "--weights", "none", "--image-size", "32"))):
        assert code == 0, stderr[-3000:]
        outputs.append(last_json(stdout))
    chief, worker = outputs
    _assert_one_model_in_one_run_folder(chief, worker, run)
    assert worker["worker"] == 1
    # The chief, pipeline 0, computed the features of its half of the images only.
    assert (chief["features"]["computed"] + chief["features"]["hits"]
            == _half(chief["num_train"]) + _half(chief["num_validation"]))


def _half(count):
    return -(-count // 2)


def _assert_one_model_in_one_run_folder(chief, worker, run):
    """Two workers' summaries of 15 + 1 epochs on the scenes, and their folder."""
    assert chief["is_chief"] and not worker["is_chief"]
    assert worker["saved_model"] is None
    assert chief["strategy"] == "multi_worker"
    assert chief["num_workers"] == chief["num_replicas_in_sync"] == 2
    assert chief["weights_sha256"] == worker["weights_sha256"]
    assert chief["history"]["val_accuracy"][14] >= 0.8
    assert len(chief["history"]["val_accuracy"]) == 16
    assert ServedModel(chief["saved_model"]).class_names == chief["class_names"]
    assert sorted(os.listdir(run)) == FINISHED_RUN


def test_two_workers_distil_one_student(trained_run, scenes_dir, tmp_path):
    """`distill --strategy multi_worker`: each worker runs the teacher and the
    student's backbone on its half of the images, and the two train one student."""
    run = str(tmp_path / "student")
    student = ("--teacher", trained_run, "--student", "vgg16", "--weights", "none")
    outputs = []
    for code, stdout, stderr in _finish(_start_workers(
            run, scenes_dir, "--epochs", "15", "--learning-rate", "0.01",
            "--fine-tune-epochs", "1", "--fine-tune-layers", "3", model=student,
            command="distill")):
        assert code == 0, stderr[-3000:]
        outputs.append(last_json(stdout))
    chief, worker = outputs
    _assert_one_model_in_one_run_folder(chief, worker, run)
    assert chief["history"] == worker["history"]
    assert {"student_loss", "val_distillation_loss"} <= set(chief["history"])
    for network in ("teacher_logits", "features"):
        assert (chief[network]["computed"] + chief[network]["hits"]
                == _half(chief["num_train"]) + _half(chief["num_validation"]))
    # Over all the validation images, not the chief's half.
    with open(os.path.join(trained_run, "metrics.json")) as handle:
        teacher = json.load(handle)
    assert chief["teacher_val_accuracy"] == pytest.approx(teacher["val_accuracy"])
    assert worker["teacher_val_accuracy"] == chief["teacher_val_accuracy"]


def test_a_distilling_worker_with_other_settings_is_refused(trained_run, scenes_dir,
                                                            tmp_path):
    run = str(tmp_path / "student")
    student = ("--teacher", trained_run, "--student", "vgg16", "--weights", "none")
    (chief_code, _, chief_err), (code, _, stderr) = _finish(_start_workers(
        run, scenes_dir, "--epochs", "2", extra=((), ("--temperature", "2")),
        model=student, command="distill"))
    assert code == 2 and "temperature: 3.0 on the chief, 2.0 here" in stderr
    assert chief_code == 2 and "Lost contact with the other workers" in chief_err
    assert not os.path.exists(os.path.join(run, "metrics.json"))
