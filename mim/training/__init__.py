"""Training and evaluation: the training loop, offline retrieval metrics, comparisons and diagnoses.

train     train a DML / 3-tower / 4-tower model on a catalog into a checkpoint (`mimsearch train`)
evaluate  offline retrieval metrics of any embedder on a catalog split (`mimsearch evaluate`)
compare   the objectives trained on the same data and seeds, with intervals (`mimsearch compare`)
diagnose  what a model's image matches share (`mimsearch diagnose`)
stats     bootstrap intervals and paired differences

May import: `mim.data`, `mim.model`, `mim.search` (ranking, embedders) and the top-level helpers; nothing
imports it but the commands.
"""
