"""Evaluation: the report labeler, language metrics and image metrics."""
