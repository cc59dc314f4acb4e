"""Tables, statistics and figures of studies and sweeps, from rows and frames; the
notebooks' loader of runs."""
