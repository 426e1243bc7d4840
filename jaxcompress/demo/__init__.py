"""The `jaxcompress demo` pipeline and its data loaders (not part of the library's core).

`jaxcompress.demo.pipeline.run_pipeline` trains a small CNN on Fashion-MNIST (Debian's
``dataset-fashion-mnist``, or scikit-learn's digits), then post-training int8, gradual pruning,
W8A8 QAT of the pruned model, files (safetensors, ``jax.export``, ``model.tflite``,
``model.onnx``) and one table measured in JAX, LiteRT and ONNX Runtime.
`jaxcompress.demo.data` reads the IDX files.
"""
