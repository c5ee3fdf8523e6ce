"""Report: claims, verdict rules and figures."""
