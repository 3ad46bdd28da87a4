"""Experiments: specs (package data under ``specs/``), data, the grid runner, statistics, reports, search."""
