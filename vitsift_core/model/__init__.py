"""Models: registry, embedded conversion, MAE, attention capture and collectors."""
