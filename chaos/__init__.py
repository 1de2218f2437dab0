"""Fault and load scenarios against real courier processes: ``python -m chaos``.

Every request answered 202 must reach every legacy target with the effect of exactly once,
whatever crashes, outages or poison arrive. See ``chaos.scenarios`` for the scenarios,
``chaos.rig`` for what they run on and ``chaos.verify`` for how the invariants are measured.
"""
