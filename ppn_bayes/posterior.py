"""The gate posterior's public names, where they have always been imported from.

The module itself is :mod:`ppn_bayes.inspect.posterior`; ``from ppn_bayes import posterior``
(as in the getting-started page) keeps working through this one.
"""

from .inspect.posterior import (
    DEFAULT_SIZES,
    SUMMARY_COLUMNS,
    PosteriorDraws,
    ambiguous_units,
    check_sizes,
    plot_forest,
    plot_keep_curves,
    posterior_draws,
    summary,
    to_inference_data,
    unit_labels,
    write_summary,
)

__all__ = ["DEFAULT_SIZES", "PosteriorDraws", "SUMMARY_COLUMNS", "ambiguous_units", "check_sizes", "plot_forest",
           "plot_keep_curves", "posterior_draws", "summary", "to_inference_data", "unit_labels", "write_summary"]
