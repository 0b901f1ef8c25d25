"""Making data: the synthetic street-to-shop catalog and the JSON Lines dataset format for your own.

catalog   the catalog's records (products, street photos, splits) and their JSON file
synth     the synthetic catalog generator (`mimsearch catalog`)
render    drawing products and street photos (PIL)
dataset   a JSON Lines manifest of your own images and titles, read as a catalog (`mimsearch dataset`)

May import: `mim.atomic`, `mim.errors`, `mim.progress` and itself. Nothing here knows about models, training or search.
"""
