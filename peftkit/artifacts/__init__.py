"""What a finished run becomes: loading it (one loader for every kind of run directory), exporting it, its model card."""
