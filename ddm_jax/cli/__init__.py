"""The command lines: train, sample, evaluate, export and the fairness sweep (thin wiring
over the library, which never imports this package). `common` holds what they share."""
