"""Routing data: traces, Expert Activation Matrices, their store and recorder (no policy code).

* ``format``: routing traces in the interchange format (``RoutingTrace``, ``load_trace``, ``save_trace``).
* ``eam``: per-request Expert Activation Matrices and the ``EAMCollection`` that keeps representative ones.
* ``recorder``: ``TraceRecorder`` (begin_sequence / on_route / end_sequence) used by the expert sources.
* ``store``: ``TraceStore``, the versioned, locked, atomically written ``$MOEINF_HOME/traces/<model>/``.
* ``hints``: simulated speculative-gating hints for replay; ``heatmap`` / ``interchange``: `moeinf trace`.

The policies that use this data (``eam``, the token oracle) and the replay evaluator are in
``engine/policy``; this package imports neither it nor ``engine/memory``.
"""
