"""From a study's storage folder to the report's tables and figures: ``python -m analysis STUDY_DIR``.

From a notebook: ``from analysis.load import load_study`` then ``study.trials``, ``study.curves``,
``study.artifacts(trial)``; the figure functions live in ``analysis.figures``.
"""
