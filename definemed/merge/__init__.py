"""The `merge` stage: mergekit merge of a CPT model back into its instruct model, as a Ray task."""
