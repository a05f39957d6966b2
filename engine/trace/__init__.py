"""Expert activation matrices: record, persist, match, predict.

* ``format``: routing traces in the interchange format (``RoutingTrace``, ``load_trace``, ``save_trace``).
* ``eam``: per-request Expert Activation Matrices and the ``EAMCollection`` that keeps representative ones.
* ``recorder``: ``TraceRecorder`` (begin_sequence / on_route / end_sequence) used by the expert sources.
* ``store``: ``TraceStore``, the versioned, locked, atomically written ``$MOEINF_HOME/traces/<model>/``.
* ``policy``: ``EAMPolicy``, the trace-driven default cache policy ("eam").
* ``replay``: the offline evaluator (``replay``, ``belady_loads``, ``capacity_for``).
* ``hints``: simulated speculative-gating hints for replay; ``heatmap`` / ``interchange``: `moeinf trace`.
"""
