"""KFP component: model compression."""
