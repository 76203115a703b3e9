"""The one scoring core: (policy text, prompt) pairs -> windows -> P(unsafe) -> ``PairScore``.

``scoring.core`` (padding, length batches, softmax, window aggregation, the ``Backend`` protocol,
``Scorer``) and ``scoring.onnx`` (the ONNX Runtime backend and an exported model folder) need numpy,
tokenizers and onnxruntime only; the torch backend lives in ``training.predict``.
"""
