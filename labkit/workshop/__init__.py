"""Tools for running the lab as a workshop or talk (see ``notebooks/INSTRUCTOR.md``).

- ``python -m labkit.workshop.timings``: execute every notebook on a quiet and on a loaded CPU, record wall time,
  peak memory and CPU per kernel, and write the table in the instructor guide.
- ``python -m labkit.workshop.slides``: give notebook cells reveal.js slide metadata by rule (idempotent).
- ``python -m labkit.workshop.build``: ``make slides`` and ``make book``, offline HTML from executed notebooks.
"""
