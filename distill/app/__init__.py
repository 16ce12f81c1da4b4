"""The application layer: the stage API (:mod:`distill.app.stages`: one typed config in, one
:class:`~distill.app.stages.base.StageResult` out per stage), recipes (:mod:`distill.app.recipe`), the runner
(:mod:`distill.app.runner`, ``distill run``), gates, manifests, model cards and the command line
(:mod:`distill.app.cli`). It is the only code that imports across ``distill`` (the core), ``export`` and
``benchmarks``.
"""
