"""Experiment schemas: the sections of a run's YAML file (language fine-tuning, VTAB), and the record a
finished run leaves beside its adapter."""
