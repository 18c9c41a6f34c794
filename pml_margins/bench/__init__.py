"""The retrieval benchmark (``pml-margins bench``) and the seeds' figure (``pml-margins sphere``).

One idea per module: ``data`` (datasets and class-disjoint splits), ``models``
(embedding networks), ``registry`` (loss name -> factory), ``train`` (one run),
``evaluate`` (retrieval metrics), ``report`` (table, JSON, plot), and the two
commands ``cli_bench`` and ``cli_sphere``.
"""
