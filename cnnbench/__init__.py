"""cnnbench: controlled hyperparameter studies of convolutional networks.

Specs in studies/*.yaml become trials (config.py), trained by one loop (train.py,
fused.py) on device-resident data (data.py), recorded in MLflow (tracking.py), and
written up beside the documents' numbers (report.py). See README.md.
"""

__version__ = "0.1.0"
