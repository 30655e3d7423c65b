"""Tokenizer fertility and parity per model family (`definemed tokenizers`), and what `definemed plan` turns words
into tokens with.

One concern per module: `families` (model families and their tokenizers), `sources` (the offline tokenizers),
`sets` (streaming the text sets), `fertility` (the metrics, defined once), `report` (table and plot), `config` and
`stage`.
"""
