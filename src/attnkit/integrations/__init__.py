"""Bridges to other libraries; each optional dependency has one home here (``transformers``)."""
