"""The optimizer families, each a sub-package or a module: ``adam`` (Adam, AdamW, AdamAtan2, RAdam), ``adafactor``,
``muon`` (Muon, its orthogonalisation and QK-clip), and the element-wise rules ``sgd``, ``adagrad``, ``rmsprop`` on
``elementwise.ElementwiseOptimizer``.

They build on the core one level up (``hf_optim._base``, ``precision``, ``decay``, ``_validation``,
``_state_loading``) and never import the factory, the Trainer integration or the applications. Nothing is imported
here, so loading one family does not load the others.
"""
