"""Evaluation: packs and fragments measured on the test split (through
:mod:`snp_ray.data.testsplit`, the one door to it), the paper's protocol, tables and figures, and
``make results``. Slicing, packing and tuning never import it."""
