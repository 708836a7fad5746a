"""Write a Keras Applications network as a TF2 reusable SavedModel (TF-Hub format).

Plain TensorFlow and Keras only, no tftransfer: this is what TF-Hub and Kaggle
Models publish, and what `--backbone hub:PATH` loads. The module takes float32
images in [0, 1] at IMAGE_SIZE and returns pooled feature vectors.

Usage:
  python examples/write_hub_module.py OUTPUT [--alpha 0.75] [--image-size 224]
  tftransfer train DATA_DIR --backbone hub:OUTPUT --image-size 224
"""

import argparse

import keras
import tensorflow as tf


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    size = args.image_size
    network = keras.applications.MobileNet(
        include_top=False, weights="imagenet", alpha=args.alpha,
        input_shape=(size, size, 3), pooling="avg")

    # tf.train.Checkpoint takes any attribute, as the TF2 reusable SavedModel
    # format wants (a tf.Module's `variables` is a read-only property).
    module = tf.train.Checkpoint()
    module.variables = list(network.variables)
    module.trainable_variables = list(network.trainable_variables)
    module.regularization_losses = []

    @tf.function
    def call(images, training=False):
        # Hub convention: [0, 1] in; MobileNet wants [-1, 1].
        return network(images * 2.0 - 1.0, training=training)

    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    call.get_concrete_function(spec, False)
    call.get_concrete_function(spec, True)
    module.__call__ = call
    tf.saved_model.save(module, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
