import keras
import numpy as np

from tftransfer import build_classifier, build_head, load_backbone


def test_classifier_outputs_logits_from_pixels():
    backbone = load_backbone("vgg16", weights=None, image_size=32)
    model = build_classifier(backbone, num_classes=4)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 4)
    logits = model(np.zeros((1, 32, 32, 3), "float32")).numpy()
    # Logits, not probabilities: no softmax at the end.
    assert model.get_layer("head").layers[-1].activation is keras.activations.linear
    assert not np.isclose(logits.sum(), 1.0)


def test_head_stays_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        head = build_head(8, 3)
        output = head(np.ones((2, 8), "float16"))
        assert head.layers[-1].compute_dtype == "float32"
        assert output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
