"""What a trial and a study are: settings (`spec`) and the search space (`space`),
loaded and validated."""
