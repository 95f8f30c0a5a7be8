"""Worked solutions to the notebooks' exercises, one module per notebook (labkit/solutions/nbNN.py).

Try the exercise first: these are here so CI can check every exercise and so you can compare afterwards.
"""
