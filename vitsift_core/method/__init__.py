"""The paper's maths: pure torch/NumPy, no I/O, no threads."""
