from pml_margins.cli import entry

entry()
