"""The application: the `mimsearch` command and the end-to-end demo pipeline.

It sits on top of the libraries (mim <- export <- client <- benchmarks <- mimsearch); nothing imports it back.
"""
