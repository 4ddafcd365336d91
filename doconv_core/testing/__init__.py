"""Test and reporting helpers, apart from the runtime core (the ``numpy.testing`` convention).

* ``cases``: the fixed, seeded layer case set every adapter's tests check against the reference.
* ``crosscheck``: cross-framework equivalence through files (``python -m
  doconv_core.testing.crosscheck``).
* ``machine``: the one-line machine description the samples and benchmarks print beside their
  figures.
* ``api``: the public API every adapter offers, checked by each adapter's tests.

The runtime modules of ``doconv_core`` import nothing from here.
"""
