"""Measured comparisons. Each bench module registers itself (``@BENCHES.register``) with its settings
(``--set key=value``, typed and ranged) and ``run(quick, options) -> rows``; it is imported only when benches
are listed or run."""
