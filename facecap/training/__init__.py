"""Training loops and their data loading (attribute classifier, FLIP), free of orchestration."""
