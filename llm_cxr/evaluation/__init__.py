"""Evaluation: clinical, language and image metrics (the report labeler they use is :mod:`llm_cxr.data.labeler`)."""
