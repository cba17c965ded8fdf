import dagster as dg

# Keys are prompt-set slugs (file stems of configs/prompt_sets/*): `prompt_set_sensor` keeps them in step.
prompt_sets = dg.DynamicPartitionsDefinition(name="prompt_sets")
