"""The continual-learning agent: episodes in, updates and memory writes out.

`mempos.agent.metrics` holds the score-matrix metrics (ACC, BWT, FWT,
forgetting, intransigence) and gradient interference.
"""
