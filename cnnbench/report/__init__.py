"""Tables, statistics and figures of studies and sweeps, from rows and frames (the runs
themselves are read by cnnbench.track.reader)."""
