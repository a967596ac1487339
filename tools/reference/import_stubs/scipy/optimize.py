"""See the package docstring: importable, raising if ever called."""


def linear_sum_assignment(*a, **k):
    raise NotImplementedError("scipy.optimize.linear_sum_assignment: SciPy is not installed (import stub)")
