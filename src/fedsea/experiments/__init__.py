"""Benchmarks, the demo and experiment drivers (attack grid, privacy utility and report, task baseline).

They sit just above ``fedsea.cli``: they may use every library layer, and no library layer uses them.
"""
