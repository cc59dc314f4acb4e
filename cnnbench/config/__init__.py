"""What a trial and a study are: one trial's settings (`trial`), study and sweep specs
(`spec`) and the search space (`space`), loaded and validated."""
