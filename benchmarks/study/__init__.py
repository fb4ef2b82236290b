"""Studies: many models x settings x seeds, each combination a cell (one `zoo train` plus one
`zoo bench`), run here or on a Slurm cluster, resumable, and reported with error bars.

`spec` reads the study file into cells, `cell` runs one cell (in whatever process an executor
gives it), `driver` submits cells through an executor until each is done or out of retries,
`stats` holds the statistics and `report` the tables and the picture.
"""
