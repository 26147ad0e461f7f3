"""The lab: training, evaluation, model cards, plots and the simulated beamline."""
