"""The retrieval benchmark (``pml-margins bench``), its ablations (``pml-margins ablate``)
and the seeds' figure (``pml-margins sphere``).

One idea per module: ``data`` (class-disjoint splits), ``datasets`` (the dataset
registry: digits, glyphs, CUB-200-2011, Stanford Online Products), ``glyphs`` (the glyph
set drawn from matplotlib's fonts), ``models`` (embedding networks), ``registry`` (loss
name -> factory), ``train`` (one run), ``evaluate`` (retrieval metrics), ``report``
(table, JSON, plot), ``sweeps`` and ``sweep_report`` (the ablations), ``sphere_plot``
(the figure), and the three commands ``cli_bench``, ``cli_ablate`` and ``cli_sphere``.
"""
