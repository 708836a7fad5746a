import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import last_json

from tftransfer import ServedModel
from tftransfer.cli import main
from tftransfer.distill import Distiller, distillation_loss
from tftransfer.distill_run import DistillConfig

TEMPERATURE, WEIGHT = 2.5, 0.3


def _dense(seed, inputs=4, classes=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(classes)])


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_loss_equals_hand_computation_and_keras_distiller():
    teacher, student = _dense(1), _dense(2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, 16).astype("int32")
    t, s = teacher(x).numpy(), student(x).numpy()

    p, q = _softmax(t / TEMPERATURE), _softmax(s / TEMPERATURE)
    kl = np.mean(np.sum(p * np.log(p / q), -1)) * TEMPERATURE**2
    cross_entropy = np.mean(-np.log(_softmax(s)[np.arange(16), y]))
    expected = WEIGHT * cross_entropy + (1 - WEIGHT) * kl
    np.testing.assert_allclose(distillation_loss(t, s, TEMPERATURE), kl, rtol=1e-5)

    ours = Distiller(teacher, student, temperature=TEMPERATURE,
                     student_loss_weight=WEIGHT)
    ours.compile(optimizer="adam")
    result = ours.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    np.testing.assert_allclose(result["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(result["student_loss"], cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(result["distillation_loss"], kl, rtol=1e-5)

    # A `KLDivergence` instance, not the default "kl_divergence" string: Keras
    # 3.15 resolves the string to a plain function, which skips the softmax and
    # the T^2 factor and applies KL to the scaled logits themselves.
    peer = keras.distillation.Distiller(
        teacher, student, keras.distillation.LogitsDistillation(
            TEMPERATURE, loss=keras.losses.KLDivergence()),
        student_loss_weight=WEIGHT)
    peer.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    peer_loss = peer.compute_loss(x=x, y=y, y_pred=student(x), training=False)
    np.testing.assert_allclose(result["loss"], float(peer_loss), rtol=1e-5)

    # Sample weights weigh both losses, each summed over the batch's examples
    # and divided by its size, as Keras' "sum_over_batch_size".
    weights = rng.uniform(size=16).astype("float32")
    weights[:4] = 0.0
    kls = np.sum(p * np.log(p / q), -1) * TEMPERATURE**2
    np.testing.assert_allclose(distillation_loss(t, s, TEMPERATURE, weights),
                               np.sum(weights * kls) / 16, rtol=1e-5)
    entropies = -np.log(_softmax(s)[np.arange(16), y])
    weighted = ours.evaluate(x, y, sample_weight=weights, batch_size=16, verbose=0,
                             return_dict=True)
    np.testing.assert_allclose(weighted["distillation_loss"],
                               np.sum(weights * kls) / 16, rtol=1e-5)
    np.testing.assert_allclose(weighted["student_loss"],
                               np.sum(weights * entropies) / 16, rtol=1e-5)
    assert float(distillation_loss(t[:0], s[:0], TEMPERATURE)) == 0.0  # not NaN

    # A plain per-example function is averaged over the batch like a Loss.
    by_function = Distiller(teacher, student, temperature=TEMPERATURE,
                            student_loss_weight=WEIGHT)
    by_function.compile(student_loss=lambda y, s: keras.losses.
                        sparse_categorical_crossentropy(y, s, from_logits=True))
    again = by_function.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    np.testing.assert_allclose(again["loss"], expected, rtol=1e-5)


def test_training_changes_only_the_student():
    teacher, student = _dense(1), _dense(2)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = teacher(x).numpy().argmax(-1)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]
    distiller = Distiller(teacher, student, temperature=TEMPERATURE)
    distiller.compile(optimizer=keras.optimizers.Adam(0.05))
    history = distiller.fit(x, y, epochs=20, batch_size=16, verbose=0)
    for before, after in zip(teacher_before, teacher.get_weights()):
        assert np.array_equal(before, after)
    assert all(not np.array_equal(b, a)
               for b, a in zip(student_before, student.get_weights()))
    assert history.history["distillation_loss"][-1] < history.history[
        "distillation_loss"][0]
    assert history.history["accuracy"][-1] >= 0.9

    # Precomputed teacher logits give the same step as running the teacher.
    twin = _dense(2)
    twin.set_weights(student_before)
    student.set_weights(student_before)
    for model, data in ((student, x), (twin, {"inputs": x,
                                              "teacher_logits": teacher(x)})):
        step = Distiller(teacher if model is student else None, model,
                         temperature=TEMPERATURE)
        step.compile(optimizer=keras.optimizers.SGD(0.1))
        step.fit(data, y, epochs=1, batch_size=64, shuffle=False, verbose=0)
    for a, b in zip(student.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.fixture
def global_policy(request):
    """Sets Keras' global dtype policy for one test, then restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


@pytest.mark.parametrize("global_policy", ["mixed_float16", "mixed_bfloat16"],
                         indirect=True)
def test_mixed_precision_student_trains_with_float32_logits(global_policy):
    compute = global_policy.replace("mixed_", "")
    keras.utils.set_random_seed(3)
    teacher = keras.Sequential([keras.Input((8,)),
                                keras.layers.Dense(3, dtype="float32")])
    # A student like ours: hidden layers in the global policy, logits in float32.
    student = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(3, dtype="float32", name="logits"),
    ])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, 8)).astype("float32")
    x_test = rng.normal(size=(256, 8)).astype("float32")
    y, y_test = (teacher(v).numpy().argmax(-1) for v in (x, x_test))
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]

    distiller = Distiller(teacher, student, temperature=TEMPERATURE)
    # Plain SGD, not Adam: Adam's steps ignore the gradients' scale, so only
    # SGD stops learning when the loss is not scaled (or not unscaled) by 2**15.
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    scaled = isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    assert scaled == (compute == "float16")
    assert student.get_layer("hidden").compute_dtype == compute
    assert student.get_layer("hidden").variable_dtype == "float32"
    assert student.get_layer("hidden")(x[:2]).dtype == compute
    assert student(x[:2]).dtype == "float32"

    history = distiller.fit(x, y, epochs=10, batch_size=32, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    accuracy = distiller.evaluate(x_test, y_test, verbose=0,
                                  return_dict=True)["accuracy"]
    assert accuracy >= 0.85  # chance is 1/3
    for before, after in zip(teacher_before, teacher.get_weights()):
        assert np.array_equal(before, after)
    assert all(not np.array_equal(b, a)
               for b, a in zip(student_before, student.get_weights()))


# Run in a fresh process: the two logical CPUs must be set before TF starts.
_MIRRORED_DISTILLER = textwrap.dedent("""
    import json
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from tftransfer import Distiller

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 3, 64)

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            teacher = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
            student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
            distiller = Distiller(teacher, student, temperature=2.0,
                                  student_loss_weight=0.3)
            distiller.compile(optimizer=keras.optimizers.SGD(0.5))
        initial = [w.tolist() for w in student.get_weights()]
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        # 65 examples: the last batch's one leaves the second replica none.
        validation = tf.data.Dataset.from_tensor_slices(
            (np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]]))).batch(16)
        history = distiller.fit(data, validation_data=validation, epochs=2,
                                shuffle=False, verbose=0)
        return (initial, [w.tolist() for w in student.get_weights()],
                history.history, strategy.num_replicas_in_sync)

    print(json.dumps([train(tf.distribute.get_strategy()),
                      train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]))
""")


def test_distiller_under_mirrored_strategy_trains_as_on_one_device():
    """Keras loss objects divide by the replicas under tf.distribute; the soft
    loss must be weighed the same, or two replicas train another model."""
    done = subprocess.run([sys.executable, "-c", _MIRRORED_DISTILLER],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    (initial, one, one_history, one_replicas), (_, two, two_history, replicas) = (
        json.loads(done.stdout.splitlines()[-1]))
    assert (one_replicas, replicas) == (1, 2)
    assert not np.allclose(initial[0], one[0], atol=1e-3)  # it did train
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for name in ("loss", "student_loss", "distillation_loss", "val_loss",
                 "val_student_loss", "val_distillation_loss"):
        np.testing.assert_allclose(one_history[name], two_history[name], rtol=1e-5)


def test_config_round_trip():
    distiller = Distiller(_dense(1), _dense(2), temperature=4.0,
                          student_loss_weight=0.2)
    clone = Distiller.from_config(distiller.get_config())
    assert (clone.temperature, clone.student_loss_weight) == (4.0, 0.2)
    assert clone.student.output_shape == (None, 3)


def test_distill_command_writes_a_served_student(trained_run, scenes_dir, tmp_path,
                                                  capsys):
    run = str(tmp_path / "student")
    args = ["distill", scenes_dir, "--teacher", trained_run, "--output", run,
            "--student", "vgg16", "--weights", "none", "--epochs", "15",
            "--learning-rate", "0.01", "--json"]
    assert main(args) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["image_size"] == 32  # the teacher's
    assert summary["val_accuracy"] >= 0.8
    served = ServedModel(summary["saved_model"])
    model = keras.saving.load_model(summary["model"])
    samples = [os.path.join(scenes_dir, c, f"{c}_003.jpg")
               for c in ("desert", "forest", "ocean")]
    from tftransfer.data import decode_image

    pixels = tf.stack([decode_image(tf.io.read_file(p), 32) for p in samples])
    np.testing.assert_allclose(served.predict_files(samples),
                               tf.nn.softmax(model(pixels)).numpy(), atol=1e-4)

    # The teacher's logits came from the cache the second time; a SavedModel
    # teacher gives the same logits through its raw-bytes signature.
    assert main([*args[:-1], "--overwrite", "--json"]) == 0
    again = last_json(capsys.readouterr().out)
    assert again["val_accuracy"] == summary["val_accuracy"]
    from_saved_model = [*args[:3], os.path.join(trained_run, "saved_model"),
                        *args[4:-1], "--image-size", "32", "--output",
                        str(tmp_path / "student2"), "--json"]
    assert main(from_saved_model) == 0
    assert last_json(capsys.readouterr().out)["val_accuracy"] >= 0.8


@pytest.mark.parametrize("problem", ["classes", "size"])
def test_mismatched_teacher_is_refused_before_training(trained_run, scenes_dir,
                                                       tmp_path, capsys, problem):
    data = scenes_dir
    extra = []
    if problem == "classes":
        import shutil

        data = str(tmp_path / "two")
        for name in ("desert", "forest"):
            shutil.copytree(os.path.join(scenes_dir, name), os.path.join(data, name))
    else:
        extra = ["--image-size", "48"]
    run = tmp_path / "student"
    assert main(["distill", data, "--teacher", trained_run, "--output", str(run),
                 "--student", "vgg16", "--weights", "none", *extra]) == 2
    error = capsys.readouterr().err
    assert ("classes" in error) if problem == "classes" else ("32 px" in error)
    assert "Traceback" not in error and not run.exists()


def test_distill_command_under_float16_keeps_a_float32_head(trained_run, scenes_dir,
                                                            tmp_path, capsys):
    args = ["distill", scenes_dir, "--teacher", trained_run, "--student", "vgg16",
            "--weights", "none", "--epochs", "15", "--learning-rate", "0.01",
            "--mixed-precision", "float16", "--json"]
    assert main([*args, "--output", str(tmp_path / "head")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["dtype_policy"] == "mixed_float16"
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    assert summary["val_accuracy"] >= 0.8
    model = keras.saving.load_model(summary["model"])
    conv = model.get_layer("backbone").layers[-1].get_layer("block1_conv1")
    assert (conv.compute_dtype, conv.variable_dtype) == ("float16", "float32")
    assert model.get_layer("head").get_layer("logits").compute_dtype == "float32"
    assert model(np.zeros((1, 32, 32, 3), "float32")).dtype == "float32"

    # Fine-tuning trains the float16 backbone through the loss-scaled optimizer:
    # its steps must reach the unfrozen top (none skipped for overflow) and only
    # it. (Random VGG16 weights make the fine-tuned accuracy meaningless, in
    # float32 as well, so it is not asserted.)
    assert main([*args, "--fine-tune-epochs", "1", "--fine-tune-layers", "3",
                 "--output", str(tmp_path / "fine_tuned")]) == 0
    tuned = last_json(capsys.readouterr().out)
    assert tuned["dtype_policy"] == "mixed_float16"
    assert tuned["history"]["val_accuracy"][:15] == summary["history"]["val_accuracy"]
    assert np.isfinite(tuned["history"]["loss"][15])
    networks = [keras.saving.load_model(s["model"]).get_layer("backbone").layers[-1]
                for s in (summary, tuned)]

    def changed(layer):
        before, after = (n.get_layer(layer).get_weights() for n in networks)
        return not all(np.array_equal(b, a) for b, a in zip(before, after))

    assert changed("block5_conv3") and not changed("block1_conv1")

    # The previous policy comes back when a run fails, too.
    assert main(["distill", scenes_dir, "--teacher", str(tmp_path / "missing"),
                 "--output", str(tmp_path / "failed"), "--student", "vgg16",
                 "--weights", "none", "--mixed-precision", "float16"]) == 2
    assert "No teacher model" in capsys.readouterr().err
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="mixed_precision"):
        DistillConfig(scenes_dir, trained_run, mixed_precision="float32")


def test_distill_command_under_xla(trained_run, scenes_dir, tmp_path, capsys):
    """`--jit on` compiles the teacher's and the student's forward passes and
    the Distiller's own train_step in both phases, and the student still learns."""
    assert main(["distill", scenes_dir, "--teacher", trained_run, "--student",
                 "vgg16", "--weights", "none", "--epochs", "15", "--learning-rate",
                 "0.01", "--fine-tune-epochs", "1", "--fine-tune-layers", "3",
                 "--jit", "on", "--json",
                 "--output", str(tmp_path / "xla")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["xla"] == {"teacher": True, "forward": True, "head": True,
                              "fine_tune": True}
    assert summary["history"]["val_accuracy"][14] >= 0.8  # after the head phase
    assert np.isfinite(summary["history"]["loss"][15])
    with pytest.raises(ValueError, match="jit"):
        DistillConfig(scenes_dir, trained_run, jit="yes")


def test_distill_command_under_mirrored_strategy(trained_run, scenes_dir, tmp_path,
                                                 capsys, monkeypatch):
    args = ["distill", scenes_dir, "--teacher", trained_run, "--student", "vgg16",
            "--weights", "none", "--epochs", "15", "--learning-rate", "0.01"]
    assert main([*args, "--fine-tune-epochs", "1", "--fine-tune-layers", "3",
                 "--strategy", "mirrored", "--json",
                 "--output", str(tmp_path / "mirrored")]) == 0
    summary = last_json(capsys.readouterr().out)
    assert summary["strategy"] == "mirrored"
    assert summary["num_replicas_in_sync"] == max(
        1, len(tf.config.list_logical_devices("GPU")))
    # jit auto would compile VGG16's fine-tuning on one device, not under a strategy.
    assert summary["xla"]["fine_tune"] is False
    assert summary["history"]["val_accuracy"][14] >= 0.8
    assert np.isfinite(summary["history"]["loss"][15])
    # The student, its variables mirrored, exports and serves.
    files = [os.path.join(root, name) for root, _, names in os.walk(scenes_dir)
             for name in names]
    probabilities = ServedModel(summary["saved_model"]).predict_files(files)
    assert probabilities.shape == (48, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)

    with pytest.raises(ValueError, match="strategy"):
        DistillConfig(scenes_dir, trained_run, strategy="tpu")


def test_distill_without_a_cache_spills_activations_for_the_run(trained_run, scenes_dir,
                                                              tmp_path, capsys):
    """With --no-cache the top trains on activations spilled inside the run
    folder for the run only, each batch still carrying its images' teacher
    logits."""
    assert main(["distill", scenes_dir, "--teacher", trained_run, "--student",
                 "vgg16", "--weights", "none", "--epochs", "15", "--learning-rate",
                 "0.01", "--fine-tune-epochs", "2", "--fine-tune-layers", "3",
                 "--no-cache", "--json", "--output", str(tmp_path / "run")]) == 0
    summary = last_json(capsys.readouterr().out)
    spilled = summary["fine_tune_activations"]
    assert spilled["hits"] == 0
    assert spilled["computed"] == summary["num_train"] + summary["num_validation"]
    assert not os.path.exists(tmp_path / "run" / ".activations")  # removed at the end
    history = summary["history"]
    assert history["phase"][15:] == ["fine_tune", "fine_tune"]
    assert "distillation_loss" in history and np.isfinite(history["loss"][16])
    assert history["val_accuracy"][14] >= 0.8  # after the head phase

