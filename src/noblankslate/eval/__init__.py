"""Evaluation: answer extraction, batched generation accuracy, validation loss and calibration metrics."""
