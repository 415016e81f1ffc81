"""`editsuite serve`: a local web studio on the task classes (paint a mask, run any edit, chain results)."""
