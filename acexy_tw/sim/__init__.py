"""Simulated AceStream engine (and, later, orchestrator) for tests, demo and benchmarks.

- :mod:`acexy_tw.sim.tsgen`: a cheap generator of valid MPEG-TS (``TSGenerator``);
- :mod:`acexy_tw.sim.engine`: the engine (``SimEngine``), also runnable as
  ``python -m acexy_tw.sim.engine``;
- :mod:`acexy_tw.sim.model`: its knobs and records (``Behaviour``, ``SimSession``);
- :mod:`acexy_tw.sim.playback`: one playback connection (``PlaybackStream``);
- :mod:`acexy_tw.sim.orchestrator`: the orchestrator (``SimOrchestrator``);
- :mod:`acexy_tw.sim.cli`: what their command lines share.

Nothing is imported here, so ``import acexy_tw.sim.tsgen`` stays free of twisted.web.
"""
