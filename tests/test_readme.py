"""The README's Python example runs, on generated images instead of flowers/."""

import os
import re

from conftest import REPO, shared_path


def _readme_python(section: str) -> str:
    """The first Python block of the README's section titled `section`."""
    readme = open(os.path.join(REPO, "README.md")).read()
    code = readme[readme.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", code, re.S).group(1)


def test_readme_python_example_runs(scenes_dir, tmp_path):
    shared_path("weights", "keras", "models", "mobilenet_7_5_224_tf_no_top.h5")
    code = _readme_python("Python")
    assert '"flowers/"' in code and '"saved_models/flowers"' in code
    code = code.replace('"flowers/"', repr(scenes_dir)).replace(
        '"saved_models/flowers"', repr(str(tmp_path / "export")))
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    history = namespace["history"].history
    assert history["phase"] == ["head"] * 5 + ["fine_tune"] * 2
    assert history["val_accuracy"][-1] >= 0.85
    assert namespace["accuracy"] >= 0.85  # model.evaluate after fine_tune
    assert os.path.exists(tmp_path / "export" / "saved_model.pb")


def test_readme_serving_example_runs(trained_run, scenes_dir):
    """The Serving section's Python, in a process that imports TensorFlow alone."""
    import subprocess
    import sys

    code = _readme_python("Serving")
    assert '"saved_models/flowers/saved_model"' in code and '"rose.jpg"' in code
    image = os.path.join(scenes_dir, "forest", "forest_003.jpg")
    code = code.replace('"saved_models/flowers/saved_model"',
                        repr(os.path.join(trained_run, "saved_model")))
    code = code.replace('"rose.jpg"', repr(image))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "b'forest'" in result.stdout


def test_readme_litert_example_runs(trained_run, scenes_dir, tmp_path, monkeypatch):
    code = _readme_python("Phones and edge devices")
    assert '"saved_models/flowers/model.keras"' in code and '"flowers/"' in code
    image = os.path.join(scenes_dir, "ocean", "ocean_003.jpg")
    code = code.replace('"saved_models/flowers/model.keras"',
                        repr(os.path.join(trained_run, "model.keras")))
    code = code.replace('"flowers/"', repr(scenes_dir)).replace('"rose.jpg"',
                                                               repr(image))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["report"]
    assert report["accepted"] and report["input_dtype"] == "uint8"
    assert report["tflite_accuracy"] >= report["keras_accuracy"] - 0.02
    assert namespace["lite"].class_names == ["desert", "forest", "ocean"]
    assert sorted(os.listdir(tmp_path)) == ["flowers.parity.json", "flowers.tflite",
                                            "labels.txt"]
