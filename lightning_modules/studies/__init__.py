"""Studies made of many trainings: the depth search, the seed-stacked sweep, the noise test, their reports."""
