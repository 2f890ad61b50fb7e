"""Data a run consumes: prompt sets (``prompts``), demonstrations and their file formats (``demos``),
and scripted experts that record demonstrations (``experts``)."""
