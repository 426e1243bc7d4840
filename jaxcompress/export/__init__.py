"""Deployable integer files: full-integer LiteRT (``.tflite``) and ONNX (QDQ) export."""
