"""Model code: shared layers and one small file per family."""
