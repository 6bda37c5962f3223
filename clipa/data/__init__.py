"""Training data sources, transforms and the training stream."""
