"""Framework adapters, imported as ``specops.backends.<name>``.

Each adapter turns a framework's model, loss and data into a
:class:`specops.model.ModelOperator` (and a framework's dense matrix into an
operator), and implements the :class:`specops.ops.VectorOps` protocol for the
framework's arrays. Importing ``specops.backends`` imports no framework.
"""
