"""Signed artifact registry for over-the-air updates of edge models and router policies."""
