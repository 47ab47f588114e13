"""KFP component: hyperparameter search."""
