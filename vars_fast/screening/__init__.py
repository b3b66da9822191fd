"""Catalogue screening at scale: plan (plan.py) -> read + decode (reader.py) -> denoise, detect,
features (model.py) -> Parquet shards + summary (output.py), run by the local engine (local.py)
or the Ray Data engine (ray_engine.py). Entry point: vars_fast/screen.py.
"""
