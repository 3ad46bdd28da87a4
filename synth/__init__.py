"""Synthetic data: the simulated e-commerce world and its candidate sets (numpy and pyarrow only).

It writes raw tables in the data contract of :mod:`features.contract`, plus each world's truth (the
oracle's probabilities), so that a model can be judged against the best achievable ranking.
"""
